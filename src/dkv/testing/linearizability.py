"""A Porcupine-style linearizability checker.

A *history* is a list of :class:`Operation` records: who called what, when the
call started, what it returned and when it returned.  The checker decides
whether some total order of the operations exists that (a) respects real time --
an operation that returned before another was called comes first -- and (b) is
accepted step by step by a sequential :class:`Model` of the object.

Algorithm
---------
Wing & Gong's backtracking search with Lowe's memoization, the same structure
Porcupine uses:

* Every operation contributes a *call* entry and a *return* entry; all entries
  are sorted by time and threaded on a doubly linked list.  Ties put calls
  before returns, so intervals that merely touch count as concurrent.
* Walking the list from the head, every call entry met before the first return
  entry is a candidate to be linearized next.  Linearizing one removes
  ("lifts") its call and return entries and restarts from the head; reaching a
  return entry means the operation owning it must already have been linearized,
  so the search backtracks (re-inserting the last lifted pair).
* The set of linearized operations is a bitset (a Python ``int``).  A cache of
  ``(bitset, model state)`` pairs prunes configurations already explored: the
  future of the search depends on nothing else.
* If the model supplies ``partition``, each sub-history is checked on its own
  (P-compositionality, e.g. one key at a time); the history is linearizable
  iff every partition is.

Operations whose outcome is unknown (a timed-out request, a Jepsen ``:info``)
get ``return_ = math.inf`` and, usually, the output :data:`UNKNOWN_OUTPUT`.  An
infinite return time lets the search place the operation anywhere after its
call, including after everything else -- which is indistinguishable from "it
never took effect".  Models therefore only have to give such an operation its
"took effect" semantics (see :mod:`dkv.testing.models`).

The checker takes its time source as a parameter (``clock``) so tests that use
a fake clock get a deterministic :attr:`CheckResult.UNKNOWN` when the timeout
expires.  The clock is read when checking starts, before each partition and
every :data:`CLOCK_CHECK_INTERVAL` search steps.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "CLOCK_CHECK_INTERVAL",
    "UNKNOWN_OUTPUT",
    "CheckResult",
    "Event",
    "EventKind",
    "LinearizabilityResult",
    "Model",
    "Operation",
    "UnknownOutput",
    "check_operations",
    "check_operations_verbose",
    "operations_from_events",
    "render_result",
]

CLOCK_CHECK_INTERVAL: Final = 1024
"""The search reads the clock once every this many steps."""


class UnknownOutput(enum.Enum):
    """Type of :data:`UNKNOWN_OUTPUT`, the output of an operation whose result is unknown."""

    UNKNOWN = "unknown"

    def __repr__(self) -> str:
        return "UNKNOWN_OUTPUT"


UNKNOWN_OUTPUT: Final = UnknownOutput.UNKNOWN
"""Output of an operation that never returned (timed out, crashed client, Jepsen ``:info``)."""


class CheckResult(enum.Enum):
    """Verdict of a linearizability check."""

    OK = "ok"
    """The history is linearizable."""
    ILLEGAL = "illegal"
    """No linearization exists."""
    UNKNOWN = "unknown"
    """The timeout expired before the search finished."""


@dataclass(frozen=True, slots=True)
class Operation:
    """One operation of a history.

    ``call`` and ``return_`` are timestamps in any unit (ints or floats) that
    are consistent across clients.  ``return_ = math.inf`` means the operation
    never returned: it may have taken effect at any time after ``call``, or not
    at all.  Use :meth:`unknown` to build such an operation.
    """

    client_id: int
    input: Any
    call: float
    output: Any
    return_: float

    def __post_init__(self) -> None:
        if self.return_ < self.call:
            raise ValueError(f"operation returns ({self.return_}) before its call ({self.call})")

    @classmethod
    def unknown(cls, client_id: int, input: Any, call: float) -> Operation:
        """An operation that was called but whose outcome is unknown."""
        return cls(client_id, input, call, UNKNOWN_OUTPUT, math.inf)

    @property
    def completed(self) -> bool:
        """True when the operation returned (its outcome is known)."""
        return self.return_ != math.inf


def _no_partition(history: Sequence[Operation]) -> list[list[Operation]]:
    return [list(history)]


def _describe_default(input: Any, output: Any) -> str:
    return f"{input!r} -> {output!r}"


@dataclass(frozen=True)
class Model:
    """A sequential specification.

    ``init()`` gives the initial state; ``step(state, input, output)`` returns
    ``(ok, new_state)`` where ``ok`` says whether the operation with that input
    may return that output in ``state``.  ``step`` must be pure and deterministic.
    States must be hashable (they key the memoization cache) unless
    ``state_key`` maps each state to a hashable value that is equal exactly
    when the states are equivalent.

    ``partition`` optionally splits a history into independently checkable
    sub-histories (for instance one per key); ``describe_operation`` and
    ``describe_state`` are used by :func:`render_result`.
    """

    init: Callable[[], Any]
    step: Callable[[Any, Any, Any], tuple[bool, Any]]
    partition: Callable[[Sequence[Operation]], list[list[Operation]]] | None = None
    describe_operation: Callable[[Any, Any], str] | None = None
    describe_state: Callable[[Any], str] | None = None
    state_key: Callable[[Any], Hashable] | None = None
    name: str = "model"

    def split(self, history: Sequence[Operation]) -> list[list[Operation]]:
        """The partitions of ``history`` (the whole history if the model has no ``partition``)."""
        part = self.partition or _no_partition
        return part(history)

    def describe_op(self, op: Operation) -> str:
        """A one-line description of ``op``'s input and output."""
        describe = self.describe_operation or _describe_default
        return describe(op.input, op.output)

    def describe_st(self, state: Any) -> str:
        """A description of a model state."""
        return self.describe_state(state) if self.describe_state is not None else repr(state)


# --------------------------------------------------------------------------- events


class EventKind(enum.Enum):
    """Whether an :class:`Event` is an operation's call or its return."""

    CALL = "call"
    RETURN = "return"


@dataclass(frozen=True, slots=True)
class Event:
    """A call or return event; the call and the return of one operation share ``id``.

    For a call, ``value`` is the operation's input; for a return, its output.
    """

    kind: EventKind
    client_id: int
    value: Any
    id: int


def operations_from_events(
    events: Iterable[Event], *, unknown_output: Any = UNKNOWN_OUTPUT
) -> list[Operation]:
    """Turn an event history into operations, using each event's position as its time.

    A call without a matching return becomes an operation with an unknown
    outcome (``output = unknown_output``, ``return_ = math.inf``).
    """
    pending: dict[int, tuple[int, Any, int]] = {}
    ops: list[tuple[int, Operation]] = []
    for t, ev in enumerate(events):
        if ev.kind is EventKind.CALL:
            if ev.id in pending:
                raise ValueError(f"operation id {ev.id} called twice")
            pending[ev.id] = (ev.client_id, ev.value, t)
        else:
            try:
                client, inp, call = pending.pop(ev.id)
            except KeyError:
                raise ValueError(f"return of operation id {ev.id} without a call") from None
            ops.append((call, Operation(client, inp, call, ev.value, t)))
    for client, inp, call in pending.values():
        ops.append((call, Operation(client, inp, call, unknown_output, math.inf)))
    ops.sort(key=lambda pair: pair[0])
    return [op for _, op in ops]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class LinearizabilityResult:
    """Detailed outcome of :func:`check_operations_verbose`.

    On :attr:`CheckResult.ILLEGAL`, ``partition_index``/``partition`` name the
    first sub-history found not to be linearizable, ``longest_prefix`` is the
    longest linearizable sequence of its operations the search reached (in
    linearization order, with the model state after each one in
    ``prefix_states``), and ``stuck`` lists the operations that could have
    come next in real time, none of which leads to a full linearization.
    """

    result: CheckResult
    model: Model
    partitions: int
    partitions_checked: int
    elapsed_s: float
    partition_index: int | None = None
    partition: tuple[Operation, ...] = ()
    longest_prefix: tuple[Operation, ...] = ()
    prefix_states: tuple[Any, ...] = ()
    stuck: tuple[Operation, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """True when the history is linearizable."""
        return self.result is CheckResult.OK

    def explain(self) -> str:
        """Human-readable explanation; see :func:`render_result`."""
        return render_result(self)


def _fmt_time(t: float) -> str:
    if t == math.inf:
        return "never"
    if isinstance(t, float) and t.is_integer():
        return str(int(t))
    return str(t)


def _fmt_op(model: Model, op: Operation) -> str:
    return (
        f"client {op.client_id}: {model.describe_op(op)}"
        f"  [call {_fmt_time(op.call)}, return {_fmt_time(op.return_)}]"
    )


def render_result(result: LinearizabilityResult, *, max_ops: int = 200) -> str:
    """Render a :class:`LinearizabilityResult` as text for a failing test's message."""
    model = result.model
    lines = [
        f"linearizability ({model.name}): {result.result.value.upper()}"
        f" -- {result.partitions_checked}/{result.partitions} partition(s) checked"
        f" in {result.elapsed_s:.3f}s"
    ]
    if result.result is CheckResult.UNKNOWN:
        lines.append("the timeout expired before the search finished")
    if result.result is not CheckResult.ILLEGAL:
        return "\n".join(lines)

    lines.append(
        f"partition #{result.partition_index} ({len(result.partition)} operations)"
        " is not linearizable."
    )
    lines.append(f"initial state: {model.describe_st(model.init())}")
    lines.append(
        f"longest linearizable prefix found ({len(result.longest_prefix)} operations),"
        " in linearization order, with the state after each:"
    )
    shown = list(zip(result.longest_prefix, result.prefix_states, strict=True))
    if len(shown) > max_ops:
        lines.append(f"  ... {len(shown) - max_ops} earlier operations omitted ...")
        shown = shown[-max_ops:]
    for op, state in shown:
        lines.append(f"  {_fmt_op(model, op)}  => {model.describe_st(state)}")
    final = result.prefix_states[-1] if result.prefix_states else model.init()
    lines.append("none of these operations can be linearized next:")
    for op in result.stuck:
        ok, _ = model.step(final, op.input, op.output)
        why = "leads only to dead ends" if ok else "rejected by the model in this state"
        lines.append(f"  {_fmt_op(model, op)}  ({why})")
    lines.append("all operations of the partition, by call time:")
    ops = sorted(result.partition, key=lambda o: (o.call, o.return_))
    for op in ops[:max_ops]:
        lines.append(f"  {_fmt_op(model, op)}")
    if len(ops) > max_ops:
        lines.append(f"  ... {len(ops) - max_ops} more ...")
    return "\n".join(lines)


# --------------------------------------------------------------------------- search


class _Timeout(Exception):
    pass


@dataclass(slots=True)
class _Failure:
    longest: list[int]
    states: list[Any]


def _search(
    model: Model,
    ops: Sequence[Operation],
    deadline: float | None,
    clock: Callable[[], float],
) -> _Failure | None:
    """Check one partition.  Returns None if linearizable, else the failure details.

    Raises :class:`_Timeout` when the clock passes ``deadline``.
    """
    n = len(ops)
    if n == 0:
        return None
    # Entry ids: call of op i is i, return of op i is n + i; 2n is the head
    # sentinel and 2n + 1 the tail sentinel.
    order = sorted(
        [(op.call, 0, i) for i, op in enumerate(ops)]
        + [(op.return_, 1, n + i) for i, op in enumerate(ops)]
    )
    head = 2 * n
    tail = head + 1
    nxt = [0] * (tail + 1)
    prv = [0] * (tail + 1)
    last = head
    for _, _, e in order:
        nxt[last] = e
        prv[e] = last
        last = e
    nxt[last] = tail
    prv[tail] = last

    inputs = [op.input for op in ops]
    outputs = [op.output for op in ops]
    step = model.step
    key_of = model.state_key

    state: Any = model.init()
    linearized = 0
    stack: list[tuple[int, Any]] = []  # (op, state before it)
    cache: set[tuple[int, Hashable]] = set()
    best_len = 0
    best: list[tuple[int, Any]] = []
    entry = nxt[head]
    steps = 0
    while nxt[head] != tail:
        steps += 1
        if deadline is not None and steps % CLOCK_CHECK_INTERVAL == 0 and clock() >= deadline:
            raise _Timeout
        if entry < n:  # a call entry: try to linearize this operation now
            ok, new_state = step(state, inputs[entry], outputs[entry])
            if ok:
                new_linearized = linearized | (1 << entry)
                key = (new_linearized, new_state if key_of is None else key_of(new_state))
                if key not in cache:
                    cache.add(key)
                    stack.append((entry, state))
                    state = new_state
                    linearized = new_linearized
                    if len(stack) > best_len:
                        best_len = len(stack)
                        best = list(stack)
                        best.append((-1, state))
                    # Lift the call entry and its return entry off the list.
                    p, q = prv[entry], nxt[entry]
                    nxt[p] = q
                    prv[q] = p
                    r = n + entry
                    p, q = prv[r], nxt[r]
                    nxt[p] = q
                    prv[q] = p
                    entry = nxt[head]
                    continue
            entry = nxt[entry]
        else:  # a return entry: its operation was not linearized in time
            if not stack:
                longest = [e for e, _ in best[:-1]]
                states = [s for _, s in best[1:]]
                return _Failure(longest, states)
            op, state = stack.pop()
            linearized &= ~(1 << op)
            # Unlift, in the reverse order of lifting.
            r = n + op
            nxt[prv[r]] = r
            prv[nxt[r]] = r
            nxt[prv[op]] = op
            prv[nxt[op]] = op
            entry = nxt[op]
    return None


def _stuck_ops(ops: Sequence[Operation], linearized: set[int]) -> tuple[Operation, ...]:
    remaining = [i for i in range(len(ops)) if i not in linearized]
    if not remaining:
        return ()
    first_return = min(ops[i].return_ for i in remaining)
    return tuple(ops[i] for i in remaining if ops[i].call <= first_return)


def check_operations_verbose(
    model: Model,
    history: Sequence[Operation],
    timeout_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> LinearizabilityResult:
    """Check ``history`` against ``model`` and explain a failure.

    Partitions are checked in the order ``model.partition`` returns them; the
    first illegal one stops the check.  With ``timeout_s`` set, the result is
    :attr:`CheckResult.UNKNOWN` once ``clock()`` reaches start + ``timeout_s``
    before a verdict is known.
    """
    start = clock()
    deadline = None if timeout_s is None else start + timeout_s
    partitions = model.split(history)
    for index, part in enumerate(partitions):
        if deadline is not None and clock() >= deadline:
            return LinearizabilityResult(
                CheckResult.UNKNOWN, model, len(partitions), index, clock() - start
            )
        try:
            failure = _search(model, part, deadline, clock)
        except _Timeout:
            return LinearizabilityResult(
                CheckResult.UNKNOWN, model, len(partitions), index, clock() - start
            )
        if failure is not None:
            return LinearizabilityResult(
                CheckResult.ILLEGAL,
                model,
                len(partitions),
                index + 1,
                clock() - start,
                partition_index=index,
                partition=tuple(part),
                longest_prefix=tuple(part[i] for i in failure.longest),
                prefix_states=tuple(failure.states),
                stuck=_stuck_ops(part, set(failure.longest)),
            )
    return LinearizabilityResult(
        CheckResult.OK, model, len(partitions), len(partitions), clock() - start
    )


def check_operations(
    model: Model,
    history: Sequence[Operation],
    timeout_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> CheckResult:
    """Whether ``history`` is linearizable with respect to ``model``.

    See :func:`check_operations_verbose` for the details of a failure.
    """
    return check_operations_verbose(model, history, timeout_s, clock).result
