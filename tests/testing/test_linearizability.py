"""Hand-made histories for the linearizability checker and its models."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from typing import Any

import pytest

from dkv.testing.linearizability import (
    CLOCK_CHECK_INTERVAL,
    UNKNOWN_OUTPUT,
    CheckResult,
    Event,
    EventKind,
    Model,
    Operation,
    check_operations,
    check_operations_verbose,
    operations_from_events,
    render_result,
)
from dkv.testing.models import KVState, kv_model, register_model

OK = CheckResult.OK
ILLEGAL = CheckResult.ILLEGAL
INF = math.inf


def read(client: int, value: Any, call: float, ret: float) -> Operation:
    return Operation(client, ("read", None), call, value, ret)


def write(client: int, value: Any, call: float, ret: float) -> Operation:
    return Operation(client, ("write", value), call, None, ret)


def cas(client: int, frm: Any, to: Any, swapped: Any, call: float, ret: float) -> Operation:
    return Operation(client, ("cas", (frm, to)), call, swapped, ret)


def reg(history: Sequence[Operation]) -> CheckResult:
    return check_operations(register_model(), history)


# --------------------------------------------------------------------------- register basics


def test_empty_history_is_linearizable() -> None:
    assert reg([]) is OK
    assert check_operations(kv_model(), []) is OK


def test_sequential_write_then_read() -> None:
    assert reg([write(0, 1, 0, 10), read(1, 1, 20, 30)]) is OK


def test_stale_read_after_completed_write_is_illegal() -> None:
    assert reg([write(0, 1, 0, 10), read(1, None, 20, 30)]) is ILLEGAL


def test_read_of_a_value_never_written_is_illegal() -> None:
    history = [write(0, 1, 0, 10), write(1, 2, 5, 15), read(2, 3, 0, 30)]
    assert reg(history) is ILLEGAL


@pytest.mark.parametrize("seen", [None, 1])
def test_concurrent_write_and_read_either_order(seen: Any) -> None:
    assert reg([write(0, 1, 0, 10), read(1, seen, 5, 15)]) is OK


def test_reads_must_not_go_back_in_time() -> None:
    # Both reads overlap the write, but once one read saw 1, a later read may not see nil.
    new_then_old = [write(0, 1, 0, 100), read(1, 1, 10, 20), read(2, None, 30, 40)]
    old_then_new = [write(0, 1, 0, 100), read(1, None, 10, 20), read(2, 1, 30, 40)]
    assert reg(new_then_old) is ILLEGAL
    assert reg(old_then_new) is OK


def test_touching_intervals_count_as_concurrent() -> None:
    # The read is called at the instant the write returns: either order is allowed.
    assert reg([write(0, 1, 0, 5), read(1, None, 5, 8)]) is OK
    assert reg([write(0, 1, 0, 5), read(1, None, 6, 8)]) is ILLEGAL


def test_last_of_concurrent_writes_wins() -> None:
    writes = [write(0, 1, 0, 10), write(1, 2, 0, 10)]
    assert reg([*writes, read(2, 1, 20, 30), read(3, 1, 40, 50)]) is OK
    assert reg([*writes, read(2, 2, 20, 30), read(3, 2, 40, 50)]) is OK
    assert reg([*writes, read(2, 1, 20, 30), read(3, 2, 40, 50)]) is ILLEGAL


# --------------------------------------------------------------------------- compare-and-set


def test_cas_success_and_failure_semantics() -> None:
    setup = [write(0, 1, 0, 10)]
    assert reg([*setup, cas(1, 1, 2, True, 20, 30), read(2, 2, 40, 50)]) is OK
    assert reg([*setup, cas(1, 1, 2, True, 20, 30), read(2, 1, 40, 50)]) is ILLEGAL
    # A cas that fails although the value matched is illegal, and vice versa.
    assert reg([*setup, cas(1, 1, 2, False, 20, 30)]) is ILLEGAL
    assert reg([*setup, cas(1, 3, 4, False, 20, 30), read(2, 1, 40, 50)]) is OK
    assert reg([*setup, cas(1, 3, 4, True, 20, 30)]) is ILLEGAL


def test_cas_from_nil() -> None:
    assert reg([cas(0, None, 5, True, 0, 10), read(1, 5, 20, 30)]) is OK
    assert reg([write(0, 1, 0, 10), cas(1, None, 5, True, 20, 30)]) is ILLEGAL


def test_concurrent_cas_only_one_can_win() -> None:
    setup = [write(0, 1, 0, 10)]
    both = [cas(1, 1, 2, True, 20, 30), cas(2, 1, 3, True, 20, 30)]
    one = [cas(1, 1, 2, True, 20, 30), cas(2, 1, 3, False, 20, 30)]
    assert reg([*setup, *both]) is ILLEGAL
    assert reg([*setup, *one, read(3, 2, 40, 50)]) is OK
    assert reg([*setup, *one, read(3, 3, 40, 50)]) is ILLEGAL


# --------------------------------------------------------------------------- unknown outcomes


def test_unknown_write_that_must_have_happened() -> None:
    history = [Operation.unknown(0, ("write", 7), 0), read(1, 7, 10, 20)]
    assert history[0].return_ == INF and not history[0].completed
    assert reg(history) is OK


def test_unknown_write_that_may_not_have_happened() -> None:
    assert reg([Operation.unknown(0, ("write", 7), 0), read(1, None, 10, 20)]) is OK


def test_unknown_write_cannot_take_effect_before_its_call() -> None:
    assert reg([read(1, 7, 0, 10), Operation.unknown(0, ("write", 7), 20)]) is ILLEGAL


def test_unknown_write_takes_effect_at_most_once() -> None:
    # Seen, then overwritten, then seen again: the unknown write cannot happen twice.
    history = [
        Operation.unknown(0, ("write", 7), 0),
        read(1, 7, 10, 20),
        write(2, 8, 30, 40),
        read(3, 7, 50, 60),
    ]
    assert reg(history) is ILLEGAL
    assert reg([*history[:3], read(3, 8, 50, 60)]) is OK


def test_unknown_write_once_seen_stays() -> None:
    history = [Operation.unknown(0, ("write", 7), 0), read(1, 7, 10, 20), read(2, None, 30, 40)]
    assert reg(history) is ILLEGAL


def test_unknown_cas() -> None:
    setup = [write(0, 1, 0, 5)]
    pending = Operation.unknown(1, ("cas", (1, 2)), 6)
    assert reg([*setup, pending, read(2, 2, 10, 20)]) is OK
    assert reg([*setup, pending, read(2, 1, 10, 20), read(3, 2, 30, 40)]) is OK
    assert reg([*setup, pending, read(2, 2, 10, 20), read(3, 1, 30, 40)]) is ILLEGAL
    # A cas whose expected value never held cannot explain a read of its new value.
    mismatched = Operation.unknown(1, ("cas", (9, 2)), 6)
    assert reg([*setup, mismatched, read(2, 2, 10, 20)]) is ILLEGAL


def test_unknown_read_constrains_nothing() -> None:
    history = [write(0, 1, 0, 10), Operation.unknown(1, ("read", None), 20)]
    assert reg(history) is OK


def test_operation_rejects_return_before_call() -> None:
    with pytest.raises(ValueError, match="before its call"):
        write(0, 1, 10, 5)


# --------------------------------------------------------------------------- events


def test_operations_from_events() -> None:
    events = [
        Event(EventKind.CALL, 0, ("write", 1), 0),
        Event(EventKind.CALL, 1, ("write", 2), 1),
        Event(EventKind.RETURN, 0, None, 0),
        Event(EventKind.CALL, 2, ("read", None), 2),
        Event(EventKind.RETURN, 2, 2, 2),
    ]
    ops = operations_from_events(events)
    assert [(op.client_id, op.call, op.return_) for op in ops] == [
        (0, 0, 2),
        (1, 1, INF),
        (2, 3, 4),
    ]
    assert ops[1].output is UNKNOWN_OUTPUT
    assert reg(ops) is OK  # the unfinished write of 2 explains the read
    stale = [*events, Event(EventKind.CALL, 3, ("read", None), 3), Event(EventKind.RETURN, 3, 1, 3)]
    assert reg(operations_from_events(stale)) is ILLEGAL


def test_operations_from_events_rejects_orphan_return() -> None:
    with pytest.raises(ValueError, match="without a call"):
        operations_from_events([Event(EventKind.RETURN, 0, None, 0)])


# --------------------------------------------------------------------------- key-value model


def get(client: int, key: str, value: Any, call: float, ret: float) -> Operation:
    return Operation(client, ("get", key), call, value, ret)


def put(client: int, key: str, value: Any, call: float, ret: float) -> Operation:
    return Operation(client, ("put", key, value), call, None, ret)


def kv(history: Sequence[Operation]) -> CheckResult:
    return check_operations(kv_model(), history)


def test_kv_keys_are_independent() -> None:
    history = [
        put(0, "a", 1, 0, 10),
        put(1, "b", 2, 0, 10),
        get(2, "a", 1, 20, 30),
        get(3, "b", 2, 20, 30),
        get(4, "c", None, 20, 30),
    ]
    assert kv(history) is OK
    assert len(kv_model().split(history)) == 3


def test_kv_one_illegal_key_makes_the_history_illegal() -> None:
    good_a = [put(0, "a", 1, 0, 10), get(1, "a", 1, 20, 30)]
    bad_b = [put(2, "b", 2, 0, 10), get(3, "b", None, 20, 30)]
    history = [*good_a, *bad_b]
    assert kv(good_a) is OK
    assert kv(history) is ILLEGAL
    verbose = check_operations_verbose(kv_model(), history)
    assert verbose.result is ILLEGAL
    assert verbose.partition_index == 1
    assert verbose.partitions == 2
    assert set(verbose.partition) == set(bad_b)
    assert verbose.longest_prefix == (bad_b[0],)
    assert verbose.stuck == (bad_b[1],)
    text = render_result(verbose)
    assert "ILLEGAL" in text
    assert "get 'b' -> nil" in text
    assert "rejected by the model" in text


def test_kv_delete_and_cas() -> None:
    history = [
        put(0, "k", 1, 0, 10),
        Operation(1, ("delete", "k"), 20, True, 30),
        get(2, "k", None, 40, 50),
        Operation(3, ("cas", "k", None, 5), 60, True, 70),
        get(4, "k", 5, 80, 90),
        Operation(5, ("cas", "k", 4, 6), 100, False, 110),
        Operation(6, ("cas", "k", 5, None), 120, True, 130),
        get(7, "k", None, 140, 150),
    ]
    assert kv(history) is OK
    # The same history with a wrong "existed" flag, a wrong cas verdict or a stale get.
    assert kv([*history[:1], Operation(1, ("delete", "k"), 20, False, 30)]) is ILLEGAL
    assert kv([*history[:5], Operation(5, ("cas", "k", 5, 6), 100, False, 110)]) is ILLEGAL
    assert kv([*history, get(8, "k", 5, 160, 170)]) is ILLEGAL


def test_kv_unknown_put() -> None:
    pending = Operation.unknown(0, ("put", "k", 3), 0)
    assert kv([pending, get(1, "k", 3, 10, 20)]) is OK
    assert kv([pending, get(1, "k", None, 10, 20)]) is OK
    assert kv([pending, get(1, "k", 3, 10, 20), get(2, "k", None, 30, 40)]) is ILLEGAL


def test_kv_state_is_hashable_and_immutable() -> None:
    a = KVState({"x": 1}).set("y", 2)
    b = KVState({"y": 2, "x": 1})
    assert a == b and hash(a) == hash(b)
    assert a.set("x", None) == KVState({"y": 2})
    assert dict(a) == {"x": 1, "y": 2}


# --------------------------------------------------------------------------- timeouts


class StepClock:
    """A fake clock: returns ``times`` in order, then repeats the last one."""

    def __init__(self, *times: float) -> None:
        self.times = list(times)
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.times.pop(0) if len(self.times) > 1 else self.times[0]


def hard_illegal_history(writers: int = 12) -> list[Operation]:
    """Many concurrent writes and a read of a value none of them wrote."""
    ops = [write(i, i, 0, 100) for i in range(writers)]
    return [*ops, read(writers, 99, 0, 100)]


def test_hard_history_needs_many_search_steps() -> None:
    # Without a timeout the verdict is ILLEGAL; with a frozen clock the timeout never fires.
    history = hard_illegal_history()
    assert check_operations(register_model(), history) is ILLEGAL
    frozen = StepClock(0.0)
    assert check_operations(register_model(), history, timeout_s=1.0, clock=frozen) is ILLEGAL
    # The clock was read during the search, i.e. it took several check intervals.
    assert frozen.calls > 4


def test_timeout_before_search_gives_unknown() -> None:
    clock = StepClock(0.0, 10.0)
    history = [write(0, 1, 0, 10), read(1, None, 20, 30)]
    result = check_operations_verbose(register_model(), history, timeout_s=5.0, clock=clock)
    assert result.result is CheckResult.UNKNOWN
    assert result.partitions_checked == 0
    assert "timeout expired" in render_result(result)


def test_timeout_during_search_gives_unknown() -> None:
    # start=0 (deadline 5), partition start=1, first in-search check=2, second=10: expired.
    clock = StepClock(0.0, 1.0, 2.0, 10.0)
    result = check_operations(register_model(), hard_illegal_history(), timeout_s=5.0, clock=clock)
    assert result is CheckResult.UNKNOWN
    # The verdict came from the in-search checks (every CLOCK_CHECK_INTERVAL steps).
    assert clock.calls >= 4
    assert CLOCK_CHECK_INTERVAL > 1


def test_timeout_stops_at_the_expired_partition() -> None:
    # Key "a" is fine; the clock expires before key "b" is searched.
    history = [put(0, "a", 1, 0, 10), put(1, "b", 1, 0, 10), get(2, "b", None, 20, 30)]
    clock = StepClock(0.0, 1.0, 10.0)
    result = check_operations_verbose(kv_model(), history, timeout_s=5.0, clock=clock)
    assert result.result is CheckResult.UNKNOWN
    assert result.partitions_checked == 1
    assert check_operations(kv_model(), history) is ILLEGAL


# --------------------------------------------------------------------------- model plumbing


def test_state_key_allows_unhashable_states() -> None:
    # A set-of-values model whose state is a list (unhashable) keyed by a tuple.
    def step(state: list[int], inp: Any, out: Any) -> tuple[bool, Any]:
        kind, arg = inp
        if kind == "add":
            return True, sorted([*state, arg])
        return out == state, state

    model = Model(init=list, step=step, state_key=tuple, name="set")
    adds = [Operation(0, ("add", 1), 0, None, 10), Operation(1, ("add", 2), 0, None, 10)]
    assert check_operations(model, [*adds, Operation(2, ("read", None), 20, [1, 2], 30)]) is OK
    assert check_operations(model, [*adds, Operation(2, ("read", None), 20, [1], 30)]) is ILLEGAL


def test_render_illegal_register_history() -> None:
    history = [write(0, 1, 0, 10), cas(1, 1, 2, True, 20, 30), read(2, 1, 40, 50)]
    result = check_operations_verbose(register_model(), history)
    assert not result.ok
    assert [op.client_id for op in result.longest_prefix] == [0, 1]
    assert result.prefix_states == (1, 2)
    text = result.explain()
    assert "longest linearizable prefix found (2 operations)" in text
    assert "cas 1 -> 2: ok" in text
    assert "client 2: read -> 1" in text


# --------------------------------------------------------------------------- brute force


def brute_force(model: Model, history: Sequence[Operation]) -> CheckResult:
    """Try every subset of unknown operations and every order (small histories only)."""
    known = [op for op in history if op.completed]
    unknown = [op for op in history if not op.completed]
    for k in range(len(unknown) + 1):
        for chosen in itertools.combinations(unknown, k):
            ops = known + list(chosen)
            for order in itertools.permutations(ops):
                if not respects_real_time(order):
                    continue
                if accepted(model, order):
                    return CheckResult.OK
    return CheckResult.ILLEGAL


def respects_real_time(order: Sequence[Operation]) -> bool:
    # a before b is forbidden when b returned strictly before a was called.
    return all(not (b.return_ < a.call) for i, a in enumerate(order) for b in order[i + 1 :])


def accepted(model: Model, order: Sequence[Operation]) -> bool:
    state = model.init()
    for op in order:
        ok, state = model.step(state, op.input, op.output)
        if not ok:
            return False
    return True


def random_register_history(rng: random.Random, size: int) -> list[Operation]:
    values: list[Any] = [None, 1, 2]
    ops = []
    for client in range(size):
        call = rng.randrange(0, 20)
        ret: float = call + rng.randrange(0, 8)
        kind = rng.choice(["read", "write", "cas"])
        if rng.random() < 0.15 and kind != "read":
            ret = INF
        if kind == "read":
            ops.append(read(client, rng.choice(values), call, ret))
        elif kind == "write":
            out: Any = None if ret != INF else UNKNOWN_OUTPUT
            ops.append(Operation(client, ("write", rng.choice([1, 2])), call, out, ret))
        else:
            arg = (rng.choice(values), rng.choice([1, 2]))
            out = rng.choice([True, False]) if ret != INF else UNKNOWN_OUTPUT
            ops.append(Operation(client, ("cas", arg), call, out, ret))
    return ops


def test_agrees_with_brute_force_on_random_histories() -> None:
    rng = random.Random(20240601)
    seen = {CheckResult.OK: 0, CheckResult.ILLEGAL: 0}
    for _ in range(400):
        history = random_register_history(rng, rng.randrange(1, 6))
        expected = brute_force(register_model(), history)
        assert reg(history) is expected, history
        seen[expected] += 1
    # Both verdicts occur often enough for the comparison to mean something.
    assert seen[CheckResult.OK] > 40 and seen[CheckResult.ILLEGAL] > 40, seen


def _kv_random(rng: random.Random, size: int) -> list[Operation]:
    ops = []
    for client in range(size):
        key = rng.choice("ab")
        call = rng.randrange(0, 20)
        ret = call + rng.randrange(0, 8)
        kind = rng.choice(["get", "put", "delete", "cas"])
        if kind == "get":
            ops.append(get(client, key, rng.choice([None, 1, 2]), call, ret))
        elif kind == "put":
            ops.append(put(client, key, rng.choice([1, 2]), call, ret))
        elif kind == "delete":
            ops.append(Operation(client, ("delete", key), call, rng.choice([None, True]), ret))
        else:
            inp = ("cas", key, rng.choice([None, 1]), rng.choice([None, 2]))
            ops.append(Operation(client, inp, call, rng.choice([True, False]), ret))
    return ops


@pytest.mark.parametrize("partitioned", [True, False])
def test_kv_partitioning_agrees_with_brute_force(partitioned: bool) -> None:
    base = kv_model()
    model = base if partitioned else Model(init=base.init, step=base.step, name="kv-whole")
    rng = random.Random(7)
    verdicts = set()
    for _ in range(200):
        history = _kv_random(rng, rng.randrange(1, 6))
        expected = brute_force(base, history)
        assert check_operations(model, history) is expected, history
        verdicts.add(expected)
    assert verdicts == {CheckResult.OK, CheckResult.ILLEGAL}
