"""Request limits, checked before anything is proposed (bad input loses nothing)."""

from __future__ import annotations

from dataclasses import dataclass

from dkv.errors import InvalidArgument

__all__ = ["Limits", "TooLarge"]


class TooLarge(InvalidArgument):
    """A key, value or request id over its limit (counted as ``too_large``)."""


@dataclass(frozen=True)
class Limits:
    key_bytes_max: int = 4096
    value_bytes_max: int = 1 << 20
    request_id_bytes_max: int = 128

    def check_key(self, key: bytes, what: str = "key") -> None:
        if not key:
            raise InvalidArgument(f"{what} must not be empty")
        if len(key) > self.key_bytes_max:
            raise TooLarge(f"{what} is {len(key)} bytes; the limit is {self.key_bytes_max} bytes")

    def check_value(self, value: bytes) -> None:
        if len(value) > self.value_bytes_max:
            raise TooLarge(
                f"value is {len(value)} bytes; the limit is {self.value_bytes_max} bytes "
                "(--max-value-bytes)"
            )

    def check_request_id(self, request_id: str) -> None:
        if len(request_id.encode()) > self.request_id_bytes_max:
            raise TooLarge(f"request_id is longer than {self.request_id_bytes_max} bytes")
