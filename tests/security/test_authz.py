"""dkv.security.authz: the Casbin model and policy (an allow/deny table incl. ranges that
straddle a prefix boundary, keys with '/', '*'), the compiled fast path agreeing with Casbin's
enforce on random policies, and reload on change."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dkv.errors import InvalidArgument
from dkv.security.authz import (
    DEFAULT_POLICY,
    Action,
    Authorizer,
    KeyRange,
    PolicyFiles,
    PolicyStore,
    write_default_policy,
)

POLICY = (
    DEFAULT_POLICY
    + """
p, user:alice, app/*, read
p, user:alice, app/*, write
p, user:alice, app/config, admin
p, role:metrics-reader, metrics/*, read
g, user:bob, role:metrics-reader
g, user:carol, role:writer
g, role:ops, role:admin
g, user:dan, role:ops
p, user:erin, exact/key, read
"""
)

R, W, A = Action.READ, Action.WRITE, Action.ADMIN
K = KeyRange.key
P = KeyRange.prefix


@pytest.mark.parametrize(
    ("subject", "action", "keys", "allowed"),
    [
        # built-in roles
        ("user:admin", A, KeyRange.everything(), True),
        ("user:admin", W, K(b"anything"), True),
        ("user:reader", R, KeyRange.everything(), True),
        ("user:reader", W, K(b"x"), False),
        ("user:reader", A, KeyRange.everything(), False),
        ("user:carol", W, P(b""), True),
        ("user:carol", A, KeyRange.everything(), False),
        ("user:dan", A, KeyRange.everything(), True),  # a role of a role
        # per-prefix grants; keys with '/' are plain bytes
        ("user:alice", W, K(b"app/x/y/z"), True),
        ("user:alice", R, P(b"app/"), True),
        ("user:alice", R, P(b"app/sub/"), True),
        ("user:alice", R, KeyRange(b"app/a", b"app/b"), True),
        ("user:alice", R, KeyRange(b"app/a", None), False),  # runs past the prefix
        ("user:alice", R, KeyRange(b"ap", b"app/z"), False),  # starts before it
        ("user:alice", R, KeyRange(b"app/", b"app0"), True),  # app0 = prefix_end(app/)
        ("user:alice", R, KeyRange(b"app/", b"app0\x00"), False),  # one past the end
        ("user:alice", R, P(b"app"), False),  # "app" also covers "apple"
        ("user:alice", R, K(b"app"), False),  # the prefix without its slash
        ("user:alice", R, K(b"apple"), False),
        ("user:alice", R, KeyRange.everything(), False),  # a whole-keyspace scan needs *
        ("user:alice", A, KeyRange.everything(), False),  # admin on one key is not admin
        ("user:alice", W, K(b"other"), False),
        ("user:bob", R, K(b"metrics/cpu"), True),
        ("user:bob", W, K(b"metrics/cpu"), False),
        ("user:erin", R, K(b"exact/key"), True),
        ("user:erin", R, K(b"exact/key2"), False),
        ("user:erin", R, P(b"exact/key"), False),
        ("user:mallory", R, K(b"app/x"), False),  # nobody: deny by default
        ("role:admin", A, KeyRange.everything(), True),
        ("gateway", R, K(b"x"), False),  # components get nothing from the policy file
        # a '*' in a key is a byte like any other: no wildcard in a request
        ("user:alice", W, K(b"app/*"), True),
        ("user:alice", W, K(b"*"), False),
        ("user:erin", R, K(b"exact/*"), False),
        ("user:alice", R, KeyRange(b"app/*", b"app/*\x00"), True),
        ("user:alice", R, KeyRange(b"*", b"app/z"), False),  # '*' < 'a': starts before app/
        # non-UTF-8 keys are bytes like any other
        ("user:alice", W, K(b"app/\xff\xfe"), True),
        ("user:reader", R, K(b"\x00\xff"), True),
    ],
)
def test_allow_deny_table(subject: str, action: Action, keys: KeyRange, allowed: bool) -> None:
    auth = Authorizer.from_text(policy=POLICY)
    assert auth.allowed(subject, action, keys) is allowed
    d = auth.explain(subject, action, keys)
    assert d.allowed is allowed
    if allowed:
        assert d.rule is not None and d.reason.startswith("allowed by 'p, ")
    else:
        assert d.rule is None and d.reason.startswith(f"no rule lets {subject}")


def test_explanations_name_the_rule_and_the_roles() -> None:
    auth = Authorizer.from_text(policy=POLICY)
    d = auth.explain("user:dan", A, KeyRange.everything())
    assert d.rule == ("role:admin", "*", "admin")
    assert auth.roles("user:dan") == ["role:admin", "role:ops"]
    denied = auth.explain("user:bob", W, K(b"metrics/cpu"))
    assert "(roles: role:metrics-reader)" in denied.reason and "write" in denied.reason
    assert "(no roles)" in auth.explain("user:zed", R, K(b"a")).reason


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("p, user:x, a*b, read", "may only end a pattern"),
        ("p, user:x, *a, read", "may only end a pattern"),
        ("p, user:x, a, delete", "must be read, write or admin"),
        ("q, user:x, a, read", "is not 'p, sub, obj, act'"),
    ],
)
def test_bad_policies_are_refused(line: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        Authorizer.from_text(policy=DEFAULT_POLICY + line + "\n")


# -- the fast path is Casbin's decision -------------------------------------------------------

KEYS = st.binary(min_size=0, max_size=4).map(lambda b: bytes(c % 4 + 0x61 for c in b))
PATTERN = st.one_of(
    st.just("*"),
    KEYS.map(lambda k: k.decode() + "*"),
    KEYS.filter(bool).map(lambda k: k.decode()),
)
SUBJECTS = st.sampled_from(["user:a", "user:b", "role:x", "role:y"])
ACTIONS = st.sampled_from(list(Action))


@st.composite
def policies(draw: st.DrawFn) -> str:
    lines = [
        f"p, {draw(SUBJECTS)}, {draw(PATTERN)}, {draw(ACTIONS)}"
        for _ in range(draw(st.integers(0, 6)))
    ]
    users, roles = st.sampled_from(["user:a", "user:b"]), st.sampled_from(["role:x", "role:y"])
    lines += [f"g, {draw(users)}, {draw(roles)}" for _ in range(draw(st.integers(0, 3)))]
    return "\n".join(lines) + "\n"


@st.composite
def ranges(draw: st.DrawFn) -> KeyRange:
    start = draw(KEYS)
    kind = draw(st.sampled_from(["key", "prefix", "range", "open"]))
    if kind == "key":
        return KeyRange.key(start)
    if kind == "prefix":
        return KeyRange.prefix(start)
    if kind == "open":
        return KeyRange(start, None)
    return KeyRange(start, start + draw(KEYS) + b"a")


@settings(max_examples=300, deadline=None)
@given(policies(), SUBJECTS, ACTIONS, ranges())
def test_the_fast_path_agrees_with_casbins_enforce(
    policy: str, subject: str, action: Action, keys: KeyRange
) -> None:
    auth = Authorizer.from_text(policy=policy)
    assert auth.allowed(subject, action, keys) == auth.explain(subject, action, keys).allowed


# -- files and reload ------------------------------------------------------------------------


def test_policy_files_reload_on_change_and_keep_the_last_good_one(tmp_path: Path) -> None:
    files = write_default_policy(tmp_path / "auth")
    store = PolicyStore(files, poll_interval_ms=10)
    first = store.current
    assert first.allowed("user:reader", R, K(b"k"))
    assert not store.check_now()  # nothing changed

    files.policy.write_text(DEFAULT_POLICY.replace("g, user:reader, role:reader\n", ""))
    os.utime(files.policy, ns=(1, 1))  # a different mtime even within one clock tick
    assert not store.check_now()  # changed since the last poll: it may still be written
    assert store.current is first
    assert store.check_now()  # the same at two polls: loaded
    assert store.current is not first
    assert not store.current.allowed("user:reader", R, K(b"k"))
    assert first.allowed("user:reader", R, K(b"k"))  # the old object never changes

    good = store.current
    files.policy.write_text("p, user:x, a*b, read\n")  # bad: refused, the old one stays
    assert not store.check_now() and store.reload_failures == 0
    assert not store.check_now()
    assert store.current is good and store.reload_failures == 1
    assert not store.check_now() and store.reload_failures == 1  # not retried every poll

    # Kubernetes replaces a ConfigMap by swapping a symlink: the resolved file changes.
    real = tmp_path / "v2"
    real.mkdir()
    (real / "policy.csv").write_text(DEFAULT_POLICY + "p, user:eve, e/*, read\n")
    link = tmp_path / "auth" / "link.csv"
    link.symlink_to(real / "policy.csv")
    linked = PolicyStore(PolicyFiles(files.model, link), poll_interval_ms=10)
    assert linked.current.allowed("user:eve", R, K(b"e/1"))
    (tmp_path / "v3").mkdir()
    (tmp_path / "v3" / "policy.csv").write_text(DEFAULT_POLICY)
    link.unlink()
    link.symlink_to(tmp_path / "v3" / "policy.csv")
    assert not linked.check_now()
    assert linked.check_now()
    assert not linked.current.allowed("user:eve", R, K(b"e/1"))


def test_a_policy_caught_half_written_is_never_in_force(tmp_path: Path) -> None:
    """An editor rewriting policy.csv in place (truncate, write) caught between two writes by
    a poll: the policy cut short names a role that grants more (role:admin for role:admin-ro).
    It must never be in force; the whole file is, once it stopped changing."""
    files = write_default_policy(tmp_path)
    base = DEFAULT_POLICY + "p, role:admin-ro, *, read\n"
    files.policy.write_text(base)
    store = PolicyStore(files)
    full = base + "g, user:bob, role:admin-ro\n"
    everything = KeyRange.everything()

    files.policy.write_text(full[: -len("-ro\n")])  # "... g, user:bob, role:admin"
    os.utime(files.policy, ns=(1, 1))
    assert not store.check_now()
    assert not store.current.allowed("user:bob", A, everything)
    files.policy.write_text(full)
    os.utime(files.policy, ns=(2, 2))
    assert not store.check_now()
    assert not store.current.allowed("user:bob", A, everything)
    assert store.check_now()
    assert store.current.allowed("user:bob", R, everything)
    assert not store.current.allowed("user:bob", A, everything)
    assert store.reloads == 1


def test_a_policy_that_changes_while_it_is_read_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = write_default_policy(tmp_path)
    store = PolicyStore(files)
    files.policy.write_text(DEFAULT_POLICY + "g, user:bob, role:admin\n")  # half of an edit
    os.utime(files.policy, ns=(1, 1))
    assert not store.check_now()
    load = Authorizer.from_files

    def load_then_edit(f: PolicyFiles) -> Authorizer:
        loaded = load(f)
        f.policy.write_text(DEFAULT_POLICY + "g, user:bob, role:reader\n")  # the rest of it
        os.utime(f.policy, ns=(2, 2))
        return loaded

    monkeypatch.setattr(Authorizer, "from_files", load_then_edit)
    assert not store.check_now()  # what it read is not what the file holds: not swapped in
    monkeypatch.setattr(Authorizer, "from_files", load)
    assert not store.current.allowed("user:bob", A, KeyRange.everything())
    assert not store.check_now()  # settling
    assert store.check_now()
    assert store.current.allowed("user:bob", R, K(b"k"))
    assert not store.current.allowed("user:bob", A, KeyRange.everything())


def test_a_process_refuses_to_start_on_a_bad_or_missing_policy(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="does not exist"):
        PolicyStore(PolicyFiles(tmp_path / "m.conf", tmp_path / "p.csv"))
    files = write_default_policy(tmp_path)
    files.policy.write_text("p, user:x, *, fly\n")
    with pytest.raises(InvalidArgument, match="must be read, write or admin"):
        PolicyStore(files)


def test_the_watcher_swaps_policies_while_running(tmp_path: Path) -> None:
    files = write_default_policy(tmp_path)
    store = PolicyStore(files, poll_interval_ms=10)

    async def scenario() -> None:
        task = asyncio.create_task(store.run())
        try:
            files.policy.write_text(DEFAULT_POLICY + "p, user:new, n/*, write\n")
            loop = asyncio.get_running_loop()
            give_up = loop.time() + 10
            while not store.current.allowed("user:new", W, K(b"n/1")):
                assert loop.time() < give_up, "the new policy was not picked up"
                await asyncio.sleep(0.01)
        finally:
            task.cancel()

    asyncio.run(scenario())
    assert store.reloads >= 1


def test_refusals_name_long_keys_shortly() -> None:
    """A refusal's message travels in a trailer: a 4 KiB key must not overflow it."""
    text = str(K(b"\xff" * 4096))
    assert len(text) < 300 and text.endswith("...(+4032 bytes)")
    assert str(KeyRange(b"a", b"b")) == "[b'a', b'b')"
    assert str(KeyRange.everything()) == "every key"
