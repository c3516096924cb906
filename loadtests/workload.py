"""What the locust users do, free of locust, gevent and grpc: keys, values, the mix of operations.

- **Keys**: ``<prefix><index:08d>`` for ``index`` in ``[0, keys)``. ``uniform`` picks every index
  alike; ``zipf`` picks index ``i`` with probability proportional to ``1 / (i + 1) ** s``
  (index 0 is the hottest key). Keys are placed on shards by hash, so hot keys are not
  neighbours in the cluster; a ``range`` starts at a chosen key and reads the next
  ``range_limit`` keys in key order (every shard: the gateway merges).
- **Values**: ``<key>|<tag>|`` padded with ``.`` to ``value_size`` bytes (cut to it when the
  header is longer); a tag names the user and its write (``g3.17``: gRPC user 3, write 17), so
  a value read back tells which write it came from and that it belongs to its key.
- **Mix**: ``put=4,get=4,range=1,watch=1,cas=2`` by default (weights, not shares); each step
  of a user picks one operation by weight.
- **Record** (:class:`WriteRecord`): per key, the tags of the writes sent and of those the API
  acknowledged, so that the keys can be read back and checked after the run
  (:func:`check_read_back`): every acknowledged key is there, with a value one of its writes
  sent (a write that failed or was cut short may have happened too: gRPC cannot say).
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_WEIGHTS",
    "OPERATIONS",
    "KeyChooser",
    "ReadBack",
    "WorkloadConfig",
    "WriteRecord",
    "check_read_back",
    "make_value",
    "parse_weights",
]

OPERATIONS = ("put", "get", "range", "watch", "cas")
DEFAULT_WEIGHTS = "put=4,get=4,range=1,watch=1,cas=2"
DISTRIBUTIONS = ("uniform", "zipf")
KEYS_MAX = 10_000_000
VALUE_SIZE_MAX = 1 << 20  # the node's default --max-value-bytes (docs/http.md, "Sizes")
RANGE_LIMIT_MAX = 10_000  # a Range page holds at most this many keys
RECORD_TAGS_MAX = 2_000_000  # past this the record stops (and says so): memory is bounded


def parse_weights(text: str) -> dict[str, int]:
    """``"put=4,get=1"`` -> ``{"put": 4, "get": 1, "range": 0, ...}``; unknown names refused."""
    weights = dict.fromkeys(OPERATIONS, 0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, number = part.partition("=")
        name = name.strip()
        if not sep or name not in weights:
            raise ValueError(
                f"weights: {part!r} is not op=weight with op one of {', '.join(OPERATIONS)}"
            )
        try:
            weights[name] = int(number)
        except ValueError:
            raise ValueError(f"weights: {part!r}: the weight is not an integer") from None
        if weights[name] < 0:
            raise ValueError(f"weights: {part!r}: the weight is negative")
    if not any(weights.values()):
        raise ValueError(f"weights: {text!r} gives every operation weight 0")
    return weights


@dataclass(frozen=True)
class WorkloadConfig:
    """The options every user of one run shares (locust's ``--dkv-*`` flags)."""

    key_prefix: bytes
    keys: int = 10_000
    distribution: str = "uniform"
    zipf_s: float = 1.1
    value_size: int = 256
    weights: Mapping[str, int] = field(default_factory=lambda: parse_weights(DEFAULT_WEIGHTS))
    range_limit: int = 10
    serializable_reads: bool = False
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.key_prefix:
            raise ValueError(
                "the key prefix must not be empty (the run's keys are read back by it)"
            )
        if not 1 <= self.keys <= KEYS_MAX:
            raise ValueError(f"keys must be in [1, {KEYS_MAX}], not {self.keys}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"distribution must be one of {', '.join(DISTRIBUTIONS)}, not {self.distribution!r}"
            )
        if self.zipf_s <= 0:
            raise ValueError(f"the Zipf exponent must be > 0, not {self.zipf_s}")
        if not 0 <= self.value_size <= VALUE_SIZE_MAX:
            raise ValueError(f"value size must be in [0, {VALUE_SIZE_MAX}], not {self.value_size}")
        if not 1 <= self.range_limit <= RANGE_LIMIT_MAX:
            raise ValueError(f"range limit must be in [1, {RANGE_LIMIT_MAX}]")
        if self.timeout_s <= 0:
            raise ValueError("the timeout must be > 0")
        if set(self.weights) != set(OPERATIONS) or not any(self.weights.values()):
            raise ValueError(f"weights must name {', '.join(OPERATIONS)}, one of them > 0")

    def key(self, index: int) -> bytes:
        return self.key_prefix + b"%08d" % index

    def range_end(self) -> bytes:
        """The end of the run's key space (exclusive): the prefix with its last byte + 1."""
        return prefix_end(self.key_prefix)


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key after every key that starts with ``prefix`` (etcd's rule)."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\0"
    end[-1] += 1
    return bytes(end)


class KeyChooser:
    """Picks key indexes by the configured distribution (one per user, its own RNG)."""

    def __init__(self, config: WorkloadConfig, rng: random.Random) -> None:
        self._rng = rng
        self._n = config.keys
        self._cum: list[float] | None = None
        if config.distribution == "zipf":
            self._cum = _zipf_cumulative(config.keys, config.zipf_s)

    def index(self) -> int:
        if self._cum is None:
            return self._rng.randrange(self._n)
        return self._rng.choices(range(self._n), cum_weights=self._cum)[0]


_ZIPF_CACHE: dict[tuple[int, float], list[float]] = {}


def _zipf_cumulative(n: int, s: float) -> list[float]:
    """Cumulative weights ``sum(1/k**s, k=1..i)``: computed once per process and shared."""
    cum = _ZIPF_CACHE.get((n, s))
    if cum is None:
        cum = list(itertools.accumulate(1.0 / k**s for k in range(1, n + 1)))
        _ZIPF_CACHE[(n, s)] = cum
    return cum


def make_value(key: bytes, tag: str, size: int) -> bytes:
    """``<key>|<tag>|`` padded with ``.`` to ``size`` bytes, or cut to it."""
    head = b"%s|%s|" % (key, tag.encode())
    return head[:size] if len(head) >= size else head + b"." * (size - len(head))


class WriteRecord:
    """Per key, the tags of every write sent (``attempted``, recorded before sending: a user
    stopped mid-call, or a call that failed, may still have written) and of those the API
    acknowledged (``acked``).

    Bounded: past ``tags_max`` tags it stops recording and says so (``complete`` is False), and
    the read-back check is then skipped, not wrong.
    """

    def __init__(self, tags_max: int = RECORD_TAGS_MAX) -> None:
        self.attempted: dict[str, list[str]] = {}
        self.acked: dict[str, list[str]] = {}
        self._tags = 0
        self._tags_max = tags_max
        self.complete = True

    def _add(self, table: dict[str, list[str]], key: bytes, tag: str) -> None:
        if self._tags >= self._tags_max:
            self.complete = False
            return
        self._tags += 1
        table.setdefault(key.decode(), []).append(tag)

    def attempt(self, key: bytes, tag: str) -> None:
        self._add(self.attempted, key, tag)

    def ack(self, key: bytes, tag: str) -> None:
        self._add(self.acked, key, tag)

    def to_json(self, config: WorkloadConfig) -> dict[str, Any]:
        return {
            "key_prefix": config.key_prefix.decode(),
            "value_size": config.value_size,
            "complete": self.complete,
            "attempted": self.attempted,
            "acked": self.acked,
        }

    def write(self, path: Path, config: WorkloadConfig) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(config)))
        tmp.replace(path)


@dataclass(frozen=True)
class ReadBack:
    """What :func:`check_read_back` found."""

    keys_acked: int
    keys_found: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def check_read_back(record: Mapping[str, Any], found: Iterable[tuple[bytes, bytes]]) -> ReadBack:
    """Compare a run's record (``WriteRecord.to_json``) with every key-value read back under
    its prefix: each acknowledged key is there, holding a value that one of the writes sent to
    it wrote, and no other key is under the prefix."""
    size = int(record["value_size"])
    attempted: dict[str, list[str]] = record["attempted"]
    acked: dict[str, list[str]] = record["acked"]
    problems: list[str] = []
    seen: set[str] = set()
    for raw_key, value in found:
        key = raw_key.decode(errors="replace")
        seen.add(key)
        tags = attempted.get(key, [])
        if not tags:
            problems.append(f"{key}: read back, but no write of this run wrote it")
        elif value not in {make_value(raw_key, t, size) for t in tags}:
            problems.append(
                f"{key}: holds {value[:60]!r}, which none of its {len(tags)} writes sent"
            )
    missing = sorted(set(acked) - seen)
    if missing:
        problems.append(f"{len(missing)} acknowledged keys are missing, e.g. {missing[:3]}")
    return ReadBack(keys_acked=len(acked), keys_found=len(seen), problems=problems[:20])
