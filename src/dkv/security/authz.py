"""Authorization with Casbin: who may read, write or administer which keys.

**Model** (RBAC with key-range resources, deny by default; :data:`DEFAULT_MODEL`)::

    p, role:writer, app/*, write      # a permission: subject, key pattern, action
    g, user:alice, role:writer        # alice has the role writer

Subjects are identities (:mod:`dkv.security.identity`: ``user:alice``, ``node:n1``, ``gateway``)
or roles (``role:...``). Actions are ``read`` (get, range, watch), ``write`` (put, delete,
compare-and-swap) and ``admin`` (membership and replica changes, drain, leader transfer,
snapshot, status of internals); they do not imply each other, so the built-in roles list them
all (:data:`DEFAULT_POLICY`: ``role:reader``, ``role:writer``, ``role:admin``).

**Key patterns** are key ranges, as etcd's permissions are: ``*`` is every key, ``app/*``
every key that starts with ``app/`` (keys may contain ``/``: this is a byte prefix, Casbin's
``keyMatch`` sense of a trailing ``*``), anything else one exact key. A ``*`` anywhere but at
the end is refused when the policy loads: a range check could not honour it. Patterns are
UTF-8; keys are bytes compared as bytes.

**Requests are ranges too**: a get or put is the range of its one key; a Range, a range
Delete or a Watch is its whole ``[key, range_end)``, and is allowed only when one granted
pattern contains all of it (etcd's rule). A prefix scan of the whole keyspace needs ``*``;
admin actions are checked on the whole keyspace, so they too need a grant on ``*``.

**Enforcement** is Casbin's (``casbin.Enforcer`` with the matcher
``g(r.sub, p.sub) && rangeIn(r.obj, p.obj) && r.act == p.act``), which evaluates every policy
line per request (≈ 65 µs with ten lines). The hot path asks :meth:`Authorizer.allowed`
instead: the subject's implicit permissions (its own and its roles', from Casbin's role
manager) compiled once into ranges, cached per subject for the life of this policy; the tests
check the two agree on random policies and requests. :meth:`Authorizer.explain` asks
Casbin itself and names the rule (``dkvctl auth check``).

**Reload**: a policy is immutable once loaded; :class:`PolicyStore` polls the files and swaps
in a new :class:`Authorizer` (one attribute assignment) only once the files stopped changing
and it loaded and validated whole, so no request sees half a policy (neither half-loaded nor
half-written), and a bad edit keeps the old policy (logged).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import casbin

from dkv.errors import InvalidArgument
from dkv.keys import prefix_end

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_POLICY",
    "Action",
    "Authorizer",
    "Decision",
    "KeyRange",
    "PolicyFiles",
    "PolicyStore",
    "write_default_policy",
]

log = logging.getLogger("dkv.security.authz")

DEFAULT_MODEL = """\
# dkv's access model (docs/security.md): RBAC over key ranges, deny by default.
[request_definition]
r = sub, obj, act

[policy_definition]
p = sub, obj, act

[role_definition]
g = _, _

[policy_effect]
e = some(where (p.eft == allow))

[matchers]
m = g(r.sub, p.sub) && rangeIn(r.obj, p.obj) && r.act == p.act
"""

DEFAULT_POLICY = """\
# dkv's access policy (docs/security.md). Reloaded when this file changes.
# p, SUBJECT, KEY-PATTERN, ACTION   a permission: * every key, app/* keys starting with app/
# g, SUBJECT, ROLE                  a role for a subject (user:NAME, or another role)
p, role:reader, *, read
p, role:writer, *, read
p, role:writer, *, write
p, role:admin, *, read
p, role:admin, *, write
p, role:admin, *, admin
g, user:admin, role:admin
g, user:reader, role:reader
"""

SUBJECT_CACHE_MAX = 4096
"""Subjects whose compiled permissions one policy keeps (least recently used dropped)."""


class Action(StrEnum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class KeyRange:
    """``[start, end)`` of keys; ``end`` None is "to the end of the keyspace"."""

    start: bytes
    end: bytes | None

    @classmethod
    def key(cls, key: bytes) -> KeyRange:
        return cls(key, key + b"\0")

    @classmethod
    def of_request(cls, key: bytes, range_end: bytes) -> KeyRange:
        """etcd's encoding: empty ``range_end`` is the one key, ``\\0`` every key >= ``key``."""
        if not range_end:
            return cls.key(key)
        if range_end == b"\0":
            return cls(key, None)
        return cls(key, range_end)

    @classmethod
    def prefix(cls, prefix: bytes) -> KeyRange:
        end = prefix_end(prefix) if prefix else b""
        return cls(prefix, end or None)

    @classmethod
    def everything(cls) -> KeyRange:
        return cls(b"", None)

    def within(self, outer: KeyRange) -> bool:
        if self.start < outer.start:
            return False
        if outer.end is None:
            return True
        return self.end is not None and self.end <= outer.end

    def __str__(self) -> str:
        if self.end is None:
            return f"[{_show(self.start)}, end)" if self.start else "every key"
        if self.end == self.start + b"\0":
            return _show(self.start)
        return f"[{_show(self.start)}, {_show(self.end)})"


KEY_SHOWN_BYTES_MAX = 64
"""Refusals name keys in gRPC's status message, which travels in a trailer: a 4 KiB key
written as bytes would overflow the peer's metadata limit and lose the status."""


def _show(key: bytes) -> str:
    if len(key) <= KEY_SHOWN_BYTES_MAX:
        return repr(key)
    return f"{key[:KEY_SHOWN_BYTES_MAX]!r}...(+{len(key) - KEY_SHOWN_BYTES_MAX} bytes)"


def pattern_range(pattern: str) -> KeyRange:
    """The keys a policy pattern grants (see the module docstring). InvalidArgument for a
    ``*`` elsewhere than at the end."""
    if "*" in pattern[:-1]:
        raise InvalidArgument(
            f"key pattern {pattern!r}: '*' may only end a pattern (a prefix), e.g. 'app/*'"
        )
    if pattern.endswith("*"):
        return KeyRange.prefix(pattern[:-1].encode())
    return KeyRange.key(pattern.encode())


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    # The policy line that allowed it (subject, pattern, action), None when denied.
    rule: tuple[str, ...] | None
    reason: str


@dataclass(frozen=True, slots=True)
class PolicyFiles:
    model: Path
    policy: Path

    @classmethod
    def in_directory(cls, directory: str | Path) -> PolicyFiles:
        """``model.conf`` and ``policy.csv`` in ``directory`` (a ConfigMap's mount)."""
        d = Path(directory)
        return cls(d / "model.conf", d / "policy.csv")

    def signature(self) -> tuple[tuple[int, int, int, int], ...]:
        """What changes when either file is replaced or edited (symlinks resolved: Kubernetes
        swaps a ``..data`` link when a ConfigMap changes)."""
        out = []
        for p in (self.model, self.policy):
            st = os.stat(p.resolve())
            out.append((st.st_ino, st.st_mtime_ns, st.st_size, st.st_dev))
        return tuple(out)


class Authorizer:
    """One loaded, validated policy. Immutable; thread-safe for readers."""

    def __init__(self, enforcer: Any, source: str) -> None:
        self._enforcer = enforcer
        self.source = source
        self._cache: OrderedDict[str, dict[Action, tuple[KeyRange, ...]]] = OrderedDict()
        # enforce_ex and the role manager are not safe under concurrent use; only the
        # explain path and cache misses take it (FIELD-NOTES: Casbin).
        self._lock = threading.Lock()
        self._validate()

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_files(cls, files: PolicyFiles) -> Authorizer:
        """Load and validate; InvalidArgument naming the file and the problem."""
        for p in (files.model, files.policy):
            if not p.is_file():
                raise InvalidArgument(f"access policy file {p} does not exist")
        try:
            enforcer = casbin.Enforcer(str(files.model), str(files.policy))
        except Exception as exc:  # casbin raises plain Exceptions of several kinds
            raise InvalidArgument(f"cannot load {files.model} / {files.policy}: {exc}") from exc
        return cls._with_functions(enforcer, f"{files.policy}")

    @classmethod
    def from_text(cls, model: str = DEFAULT_MODEL, policy: str = DEFAULT_POLICY) -> Authorizer:
        """From strings (tests, ``dkvctl auth check --policy-text``)."""
        m = casbin.Enforcer.new_model(text=model)
        enforcer = casbin.Enforcer(m)
        for n, line in enumerate(policy.splitlines(), start=1):
            parts = [p.strip() for p in line.split(",")]
            if not parts[0] or parts[0].startswith("#"):
                continue
            if parts[0] == "p" and len(parts) == 4:
                enforcer.add_policy(*parts[1:])
            elif parts[0] == "g" and len(parts) == 3:
                enforcer.add_grouping_policy(*parts[1:])
            else:
                raise InvalidArgument(
                    f"policy line {n}: {line!r} is not 'p, sub, obj, act' or 'g, sub, role'"
                )
        return cls._with_functions(enforcer, "(text)")

    @classmethod
    def _with_functions(cls, enforcer: Any, source: str) -> Authorizer:
        patterns: dict[str, KeyRange] = {}

        def range_in(request: object, pattern: str) -> bool:
            found = patterns.get(pattern)
            if found is None:
                found = patterns[pattern] = pattern_range(pattern)
            return isinstance(request, KeyRange) and request.within(found)

        enforcer.add_function("rangeIn", range_in)
        return cls(enforcer, source)

    def _validate(self) -> None:
        for sub, obj, act, *_ in self._enforcer.get_policy():
            pattern_range(obj)  # raises on a bad pattern
            if act not in Action.__members__.values():
                raise InvalidArgument(
                    f"policy line 'p, {sub}, {obj}, {act}': the action must be read, write or admin"
                )

    # -- deciding --------------------------------------------------------------------------------

    def _permissions(self, subject: str) -> dict[Action, tuple[KeyRange, ...]]:
        found = self._cache.get(subject)
        if found is not None:
            self._cache.move_to_end(subject)
            return found
        with self._lock:
            lines = self._enforcer.get_implicit_permissions_for_user(subject)
        grants: dict[Action, list[KeyRange]] = {a: [] for a in Action}
        for _sub, obj, act, *_ in lines:
            grants[Action(act)].append(pattern_range(obj))
        compiled = {a: tuple(r) for a, r in grants.items()}
        self._cache[subject] = compiled
        if len(self._cache) > SUBJECT_CACHE_MAX:
            self._cache.popitem(last=False)
        return compiled

    def allowed(self, subject: str, action: Action, keys: KeyRange) -> bool:
        """Whether ``subject`` may ``action`` every key of ``keys`` (the hot path)."""
        return any(keys.within(g) for g in self._permissions(subject)[action])

    def explain(self, subject: str, action: Action, keys: KeyRange) -> Decision:
        """Casbin's own decision, with the rule that allowed it."""
        with self._lock:
            ok, rule = self._enforcer.enforce_ex(subject, keys, str(action))
        if ok:
            return Decision(True, tuple(rule), f"allowed by 'p, {', '.join(rule)}'")
        roles = self.roles(subject)
        held = f" (roles: {', '.join(roles)})" if roles else " (no roles)"
        return Decision(False, None, f"no rule lets {subject}{held} {action} {keys}")

    def roles(self, subject: str) -> list[str]:
        with self._lock:
            return sorted(self._enforcer.get_implicit_roles_for_user(subject))


class PolicyStore:
    """The current :class:`Authorizer` of a process, reloaded when its files change.

    ``current`` is read on every request (an attribute read); :meth:`run` polls the files every
    ``poll_interval_ms`` and swaps in a new Authorizer once it loaded and validated whole.

    A change is loaded only once it has settled: the files look the same at two polls in a
    row, and still the same after they were read. An editor that rewrites the file in place
    (truncate, then write) can be caught half-way, and a policy cut short is not just smaller:
    ``g, user:bob, role:admin-ro`` cut after ``role:admin`` names another role. So a change
    is in force two polls after it was made (0.25-0.5 s at the default interval)."""

    def __init__(self, files: PolicyFiles, poll_interval_ms: int = 250) -> None:
        self.files = files
        self.poll_interval_ms = poll_interval_ms
        self.current = Authorizer.from_files(files)  # a bad policy refuses to start
        self._signature = files.signature()  # of the policy in force
        self._seen = self._signature  # at the last poll
        self.reloads = 0
        self.reload_failures = 0
        self.on_reload: Callable[[bool], None] | None = None

    def check_now(self) -> bool:
        """Reload if the files changed; True when a new policy is in force."""
        try:
            sig = self.files.signature()
        except OSError as exc:
            self._failed(f"cannot read the access policy files: {exc}")
            return False
        previous, self._seen = self._seen, sig
        if sig == self._signature or sig != previous:
            return False  # unchanged, or changed since the last poll: may still be written
        try:
            new = Authorizer.from_files(self.files)
        except InvalidArgument as exc:
            self._signature = sig  # do not retry the same bad content every poll
            self._failed(f"access policy not reloaded, keeping the previous one: {exc}")
            return False
        try:
            changed_while_read = self.files.signature() != sig
        except OSError:
            changed_while_read = True
        if changed_while_read:
            self._seen = ()  # read it again once it settled
            return False
        self.current = new
        self._signature = sig
        self.reloads += 1
        log.info("access policy reloaded from %s", self.files.policy)
        if self.on_reload is not None:
            self.on_reload(True)
        return True

    def _failed(self, message: str) -> None:
        self.reload_failures += 1
        log.error("%s", message)
        if self.on_reload is not None:
            self.on_reload(False)

    async def run(self) -> None:
        """Poll until cancelled (loading runs in a thread: Casbin parses files)."""
        while True:
            await asyncio.sleep(self.poll_interval_ms / 1000)
            try:
                await asyncio.to_thread(self.check_now)
            except Exception:  # a bug in loading: say so, keep the policy and the watcher
                log.exception("access policy watcher")


def write_default_policy(directory: Path, extra: str = "") -> PolicyFiles:
    """``model.conf`` and ``policy.csv`` in ``directory`` unless they exist (``make run``);
    ``extra`` lines are appended to a new policy."""
    directory.mkdir(parents=True, exist_ok=True)
    files = PolicyFiles(directory / "model.conf", directory / "policy.csv")
    if not files.model.exists():
        files.model.write_text(DEFAULT_MODEL)
    if not files.policy.exists():
        files.policy.write_text(DEFAULT_POLICY + extra)
    return files
