"""Sequential models for :mod:`dkv.testing.linearizability`.

Two models:

* :func:`register_model` -- one register with read / write / compare-and-set,
  the object Jepsen's etcd test exercises.
* :func:`kv_model` -- a key-value map with get / put / delete / compare-and-set,
  partitioned by key so every key is checked on its own.

Operations with an unknown outcome carry the output
:data:`~dkv.testing.linearizability.UNKNOWN_OUTPUT` and a return time of
``math.inf``.  The models give them their "took effect" semantics: a write
writes, a compare-and-set swaps when the expected value matches, a read
observes nothing.  "Never took effect" needs no special case because an
operation that never returned can always be linearized after every other one.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

from dkv.testing.linearizability import UNKNOWN_OUTPUT, Model, Operation

__all__ = [
    "KVState",
    "kv_model",
    "register_model",
]


# --------------------------------------------------------------------------- register


def _register_step(state: Any, input: Any, output: Any) -> tuple[bool, Any]:
    kind, arg = input
    if kind == "read":
        return (output is UNKNOWN_OUTPUT or output == state), state
    if kind == "write":
        return True, arg
    if kind == "cas":
        frm, to = arg
        if output is UNKNOWN_OUTPUT:
            return True, (to if state == frm else state)
        if output:
            return state == frm, to
        return state != frm, state
    raise ValueError(f"unknown register operation {input!r}")


def _describe_value(value: Any) -> str:
    return "nil" if value is None else repr(value)


def _register_describe(input: Any, output: Any) -> str:
    kind, arg = input
    unknown = output is UNKNOWN_OUTPUT
    if kind == "read":
        return "read -> ?" if unknown else f"read -> {_describe_value(output)}"
    if kind == "write":
        return f"write {_describe_value(arg)}" + (" (outcome unknown)" if unknown else "")
    if kind == "cas":
        frm, to = arg
        verdict = "?" if unknown else ("ok" if output else "fail")
        return f"cas {_describe_value(frm)} -> {_describe_value(to)}: {verdict}"
    return f"{input!r} -> {output!r}"


def register_model() -> Model:
    """A single register, initially ``None`` (Jepsen's ``nil``).

    Inputs and outputs:

    * ``("read", None)`` -- output: the value read (``None`` for nil).
    * ``("write", v)`` -- output: ignored.
    * ``("cas", (frm, to))`` -- set to ``to`` if the value is ``frm``; output:
      ``True`` if it swapped, ``False`` if the value was not ``frm``.

    Any output may be :data:`~dkv.testing.linearizability.UNKNOWN_OUTPUT`.
    """
    return Model(
        init=lambda: None,
        step=_register_step,
        describe_operation=_register_describe,
        describe_state=_describe_value,
        name="register",
    )


# --------------------------------------------------------------------------- key-value


class KVState(Mapping[Hashable, Any]):
    """An immutable, hashable map from key to value (absent keys are missing)."""

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[Hashable, Any] | None = None) -> None:
        self._data: dict[Hashable, Any] = dict(data or {})
        self._hash: int | None = None

    def __getitem__(self, key: Hashable) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, KVState):
            return self._data == other._data
        return NotImplemented

    def __repr__(self) -> str:
        return f"KVState({self._data!r})"

    def set(self, key: Hashable, value: Any) -> KVState:
        """A copy with ``key`` set to ``value``, or removed when ``value`` is None."""
        data = dict(self._data)
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
        return KVState(data)


_EMPTY = KVState()


def _kv_step(state: KVState, input: Any, output: Any) -> tuple[bool, Any]:
    kind = input[0]
    key = input[1]
    current = state.get(key)
    unknown = output is UNKNOWN_OUTPUT
    if kind == "get":
        return (unknown or output == current), state
    if kind == "put":
        value = input[2]
        return True, (state if current == value else state.set(key, value))
    if kind == "delete":
        ok = unknown or output is None or output == (current is not None)
        return ok, (state if current is None else state.set(key, None))
    if kind == "cas":
        expected, new = input[2], input[3]
        matches = current == expected
        if unknown:
            return True, (state.set(key, new) if matches else state)
        if output:
            return matches, state.set(key, new)
        return not matches, state
    raise ValueError(f"unknown key-value operation {input!r}")


def _kv_partition(history: Sequence[Operation]) -> list[list[Operation]]:
    by_key: dict[Hashable, list[Operation]] = {}
    for op in history:
        by_key.setdefault(op.input[1], []).append(op)
    return list(by_key.values())


def _kv_describe(input: Any, output: Any) -> str:
    kind, key = input[0], input[1]
    unknown = output is UNKNOWN_OUTPUT
    if kind == "get":
        return f"get {key!r} -> " + ("?" if unknown else _describe_value(output))
    if kind == "put":
        return f"put {key!r} = {input[2]!r}" + (" (outcome unknown)" if unknown else "")
    if kind == "delete":
        tail = "?" if unknown else ("ok" if output is None else f"existed={output!r}")
        return f"delete {key!r}: {tail}"
    if kind == "cas":
        verdict = "?" if unknown else ("ok" if output else "fail")
        return f"cas {key!r}: {_describe_value(input[2])} -> {_describe_value(input[3])}: {verdict}"
    return f"{input!r} -> {output!r}"


def _kv_describe_state(state: KVState) -> str:
    if not state:
        return "{}"
    return "{" + ", ".join(f"{k!r}: {v!r}" for k, v in state.items()) + "}"


def kv_model() -> Model:
    """A key-value map, initially empty, partitioned by key.

    Values are never ``None``: ``None`` stands for "absent".  Inputs and outputs:

    * ``("get", key)`` -- output: the value, or ``None`` if the key is absent.
    * ``("put", key, value)`` -- output: ignored.
    * ``("delete", key)`` -- output: ``None`` (ignored), or a bool saying
      whether the key existed before the delete.
    * ``("cas", key, expected, new)`` -- if the current value equals
      ``expected`` (``None``: the key must be absent), set it to ``new``
      (``None``: delete it); output: ``True`` if it swapped, else ``False``.

    Any output may be :data:`~dkv.testing.linearizability.UNKNOWN_OUTPUT`.
    States are :class:`KVState` maps; with the per-key partition each search
    only ever holds one key.
    """
    return Model(
        init=lambda: _EMPTY,
        step=_kv_step,
        partition=_kv_partition,
        describe_operation=_kv_describe,
        describe_state=_kv_describe_state,
        name="kv",
    )
