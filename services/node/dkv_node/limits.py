"""Request limits, checked before anything is proposed (bad input loses nothing).

The defaults are :mod:`dkv.sizes`'s constants, from which every server's message limits are
derived (:meth:`Limits.message_limits`): a node with bigger values accepts bigger messages.
"""

from __future__ import annotations

from dataclasses import dataclass

from dkv.errors import InvalidArgument
from dkv.sizes import (
    KEY_BYTES_MAX,
    REQUEST_ID_BYTES_MAX,
    VALUE_BYTES_MAX,
    MessageLimits,
    message_limits,
)

__all__ = ["Limits", "TooLarge"]


class TooLarge(InvalidArgument):
    """A key, value or request id over its limit (counted as ``too_large``)."""


@dataclass(frozen=True)
class Limits:
    key_bytes_max: int = KEY_BYTES_MAX
    value_bytes_max: int = VALUE_BYTES_MAX
    request_id_bytes_max: int = REQUEST_ID_BYTES_MAX

    def check_key(self, key: bytes, what: str = "key") -> None:
        if not key:
            raise InvalidArgument(f"{what} must not be empty")
        if len(key) > self.key_bytes_max:
            raise TooLarge(f"{what} is {len(key)} bytes; the limit is {self.key_bytes_max} bytes")

    def check_value(self, value: bytes, what: str = "value") -> None:
        if len(value) > self.value_bytes_max:
            raise TooLarge(
                f"{what} is {len(value)} bytes; the limit is {self.value_bytes_max} bytes "
                "(--max-value-bytes)"
            )

    def check_request_id(self, request_id: str) -> None:
        if len(request_id.encode()) > self.request_id_bytes_max:
            raise TooLarge(f"request_id is longer than {self.request_id_bytes_max} bytes")

    def message_limits(self) -> MessageLimits:
        """The gRPC message limits of a server taking requests these limits allow."""
        return message_limits(self.key_bytes_max, self.value_bytes_max, self.request_id_bytes_max)
