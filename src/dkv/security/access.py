"""Access control at every gRPC server: who is calling, and may they call this.

One enforcement point per server: :func:`dkv.host.rpc_server.new_server` takes an
:class:`Access` and its handler wrapper calls :meth:`Access.check` with the decoded request
before the handler runs (a gRPC interceptor sees only the method and metadata; the wrapper
sees the key). Every method a server serves needs a :data:`Rule`; a method without one is
refused (deny by default).

**Who is calling** (:meth:`Access.caller`): the identity of the peer's verified certificate
(:mod:`dkv.security.identity`). On the gateway's public port, when that peer is Envoy, the
caller is the client Envoy verified, from the ``x-forwarded-client-cert`` header Envoy sets
(``SANITIZE_SET``: a client's own is dropped); when there is none, the user a bearer token
named that Envoy verified (:data:`~dkv.security.tokens.SUBJECT_HEADER`, the token's ``sub``;
:mod:`dkv.security.tokens`). A certificate wins over a token. Anyone else's XFCC or token
subject header is ignored, counted and logged: it is a forgery or a misconfigured proxy.

**Rules** (what each server's table maps its methods to):

- :class:`Open`: anyone (health checks);
- :class:`Components`: dkv's own components of the listed kinds; with ``admin_users``, users
  too if the policy gives them ``admin`` on every key (node client ports, membership's reads);
- :class:`Keys`: users, for the action on the key range the request names (the public KV API);
  ``also_read`` when the answer reveals values (``prev_kv``, a value precondition);
- :class:`Admin`: users with ``admin`` on every key.

Without a policy (:class:`~dkv.security.authz.PolicyStore` None) users are not checked (the
behaviour before access control: every certificate of the CA may do what users do), but the
component rules still hold. Without TLS there is no identity and no :class:`Access` at all.

Denials answer ``UNAUTHENTICATED`` (no identity) or ``PERMISSION_DENIED`` naming the subject,
the action, the keys and the method; each is logged (rate-limited) and counted in
``dkv_auth_denied_total{reason}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter

from dkv.errors import InvalidArgument
from dkv.limited_log import RateLimitedLog
from dkv.security.authz import Action, KeyRange, PolicyFiles, PolicyStore
from dkv.security.identity import TRUST_DOMAIN, Identity, Kind, identity_from_auth_context
from dkv.security.tokens import SUBJECT_HEADER
from dkv.security.xfcc import XFCC_HEADER, identity_from_xfcc

__all__ = [
    "CALLER",
    "Access",
    "Admin",
    "AuthMetrics",
    "Components",
    "Keys",
    "Open",
    "ProcessAccess",
    "Rule",
]

log = logging.getLogger("dkv.security.access")

CALLER: ContextVar[Identity | None] = ContextVar("dkv_caller", default=None)
"""The identity of the call being served, set by the handler wrapper once :meth:`Access.check`
allowed it (None without access control): handlers that bound something per caller read it."""

XFCC_CACHE_MAX = 4096
"""XFCC headers (one per client certificate) whose identity an Access remembers."""

DENIAL_LOG_INTERVAL_S = 0.05
"""At most one denial line per this long (20/s); the next line counts those not logged."""


@dataclass(frozen=True, slots=True)
class Open:
    """Anyone may call (health checks)."""


@dataclass(frozen=True, slots=True)
class Components:
    kinds: frozenset[Kind]
    admin_users: bool = False


@dataclass(frozen=True, slots=True)
class Keys:
    action: Action
    # The keys a request names (for a stream: its first request).
    keys: Callable[[Any], KeyRange]
    # The answer shows values too (prev_kv, a value precondition): read is needed as well.
    also_read: Callable[[Any], bool] = field(default=lambda _req: False)


@dataclass(frozen=True, slots=True)
class Admin:
    """Users with ``admin`` on every key (cluster operations, status of internals)."""


Rule = Open | Components | Keys | Admin


class AuthMetrics:
    """``dkv_auth_denied_total{reason}`` and friends, in a process's registry."""

    REASONS = ("unauthenticated", "not_permitted", "component_only", "no_rule")

    def __init__(self, registry: CollectorRegistry) -> None:
        denied = Counter(
            "dkv_auth_denied_total",
            "Calls refused by access control, by reason.",
            ("reason",),
            registry=registry,
        )
        self.denied = {r: denied.labels(r) for r in self.REASONS}
        self.forged_xfcc = Counter(
            "dkv_auth_forged_xfcc_total",
            "Calls whose identity headers only Envoy may set (x-forwarded-client-cert, "
            "x-dkv-jwt-subject) were ignored because the peer was not Envoy.",
            registry=registry,
        )
        reloads = Counter(
            "dkv_auth_policy_reloads_total",
            "Access policy reloads after a change of its files, by result.",
            ("result",),
            registry=registry,
        )
        self.reloads = {r: reloads.labels(r) for r in ("ok", "failed")}

    def policy_reloaded(self, ok: bool) -> None:
        self.reloads["ok" if ok else "failed"].inc()


def _metadata(context: Any, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else None
    return None


def _token_user(subject: str) -> Identity | None:
    """The user a verified token's ``sub`` names; None when it is no user name."""
    try:
        return Identity.user(subject)
    except InvalidArgument:
        return None


def _method_name(full_method: str) -> str:
    return full_method.lstrip("/")


class Access:
    """The access rules of one server (see the module docstring)."""

    def __init__(
        self,
        server: str,
        rules: Mapping[str, Rule],
        *,
        policy: PolicyStore | None = None,
        trust_domain: str = TRUST_DOMAIN,
        trust_xfcc: bool = False,
        metrics: AuthMetrics | None = None,
    ) -> None:
        self.server = server
        self.rules = dict(rules)
        self.policy = policy
        self.trust_domain = trust_domain
        self.trust_xfcc = trust_xfcc
        self.metrics = metrics
        self._denials = RateLimitedLog(log, DENIAL_LOG_INTERVAL_S)
        self._xfcc: dict[str, Identity | None] = {}
        self._forged = RateLimitedLog(log, 1.0)

    # -- who -------------------------------------------------------------------------------------

    def peer(self, context: Any) -> Identity | None:
        return identity_from_auth_context(context.auth_context(), self.trust_domain)

    def caller(self, context: Any) -> Identity | None:
        """The caller: the client Envoy names (its certificate, else its bearer token's
        subject), on a port that trusts Envoy's headers and a connection from Envoy; else the
        peer certificate's identity."""
        peer = self.peer(context)
        xfcc = _metadata(context, XFCC_HEADER)
        token_subject = _metadata(context, SUBJECT_HEADER)
        if peer is not None and peer.kind is Kind.ENVOY and self.trust_xfcc:
            if xfcc is None:
                # No client certificate: a token Envoy verified, or nobody.
                return None if token_subject is None else _token_user(token_subject)
            # A client sends the same header on every call: parse it once (17 us -> 7 us a
            # call through Envoy, measured), in a bounded cache.
            if xfcc in self._xfcc:
                return self._xfcc[xfcc]
            try:
                found = identity_from_xfcc(xfcc, self.trust_domain)
            except InvalidArgument as exc:
                log.warning("malformed x-forwarded-client-cert from Envoy: %s", exc)
                found = None
            if len(self._xfcc) >= XFCC_CACHE_MAX:
                self._xfcc.pop(next(iter(self._xfcc)))  # the oldest entry
            self._xfcc[xfcc] = found
            return found
        if xfcc is not None or token_subject is not None:
            if self.metrics is not None:
                self.metrics.forged_xfcc.inc()
            self._forged.warning(
                "%s: ignored an %s header from %s (%s): only Envoy's is believed",
                self.server,
                XFCC_HEADER if xfcc is not None else SUBJECT_HEADER,
                peer.subject if peer else "an anonymous peer",
                context.peer(),
            )
        return peer

    # -- may they --------------------------------------------------------------------------------

    def is_open(self, full_method: str) -> bool:
        """Anyone may call it: no check is wrapped around it (health checks, whose servicer
        is grpc_health's synchronous one)."""
        return isinstance(self.rules.get(full_method), Open)

    def _user_may(self, who: Identity, action: Action, keys: KeyRange) -> bool:
        if self.policy is None:
            return True  # no policy: users are not checked (module docstring)
        return self.policy.current.allowed(who.subject, action, keys)

    async def check(self, full_method: str, request: Any, context: Any) -> Identity | None:
        """Return the caller when ``request`` to ``full_method`` is allowed, else abort the
        call with the status of the module docstring."""
        rule = self.rules.get(full_method)
        if isinstance(rule, Open):
            return None
        method = _method_name(full_method)
        who = self.caller(context)
        if rule is None:
            await self._deny(context, "no_rule", who, "call", method, method)
        if who is None:
            if self.metrics is not None:
                self.metrics.denied["unauthenticated"].inc()
            self._denials.warning(
                "denied %s on %s: no client identity (peer %s)", method, self.server, context.peer()
            )
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{method} needs a client identity: a certificate of this cluster's CA "
                "naming a spiffe://.../user/NAME URI or a CN",
            )
        assert who is not None and rule is not None
        everything = KeyRange.everything()
        match rule:
            case Components(kinds, admin_users):
                if who.kind in kinds:
                    return who
                if (
                    admin_users
                    and who.kind is Kind.USER
                    and self._user_may(who, Action.ADMIN, everything)
                ):
                    return who
                allowed = ", ".join(sorted(k.value for k in kinds))
                await self._deny(
                    context,
                    "component_only",
                    who,
                    "call",
                    f"{self.server} (only {allowed}{' and admins' if admin_users else ''})",
                    method,
                )
            case Admin():
                if who.kind is Kind.USER and self._user_may(who, Action.ADMIN, everything):
                    return who
                await self._deny(context, "not_permitted", who, "admin", "every key", method)
            case Keys(action, keys_of, also_read):
                if who.kind is not Kind.USER:
                    await self._deny(context, "component_only", who, str(action), "keys", method)
                keys = keys_of(request)
                if not self._user_may(who, action, keys):
                    await self._deny(context, "not_permitted", who, str(action), str(keys), method)
                if (
                    action is not Action.READ
                    and also_read(request)
                    and not self._user_may(who, Action.READ, keys)
                ):
                    await self._deny(
                        context,
                        "not_permitted",
                        who,
                        "read (prev_kv or a value compare)",
                        str(keys),
                        method,
                    )
                return who
        return who

    async def _deny(
        self,
        context: Any,
        reason: str,
        who: Identity | None,
        action: str,
        resource: str,
        method: str,
    ) -> None:
        subject = who.subject if who else "anonymous"
        if self.metrics is not None:
            self.metrics.denied[reason].inc()
        self._denials.warning(
            "denied: subject=%s action=%s resource=%s method=%s server=%s reason=%s",
            subject,
            action,
            resource,
            method,
            self.server,
            reason,
        )
        if reason == "no_rule":
            message = f"{method} is not served to anyone on {self.server}"
        elif reason == "component_only":
            message = f"{subject} may not call {method}: {resource}"
        else:
            message = f"{subject} may not {action} {resource} ({method})"
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)


class ProcessAccess:
    """One process's access control: its policy (reloaded on change), its metrics, and an
    :class:`Access` for each of its servers that speaks mTLS (without TLS there is no
    identity to check: None)."""

    def __init__(
        self,
        policy_dir: str,
        registry: CollectorRegistry | None,
        trust_domain: str = TRUST_DOMAIN,
    ) -> None:
        self.policy = PolicyStore(PolicyFiles.in_directory(policy_dir)) if policy_dir else None
        self.metrics = AuthMetrics(registry) if registry is not None else None
        self.trust_domain = trust_domain
        if self.policy is not None and self.metrics is not None:
            self.policy.on_reload = self.metrics.policy_reloaded
        self._task: asyncio.Task[None] | None = None

    def access(
        self, server: str, rules: Mapping[str, Rule], *, tls: bool, trust_xfcc: bool = False
    ) -> Access | None:
        if not tls:
            return None
        return Access(
            server,
            rules,
            policy=self.policy,
            trust_domain=self.trust_domain,
            trust_xfcc=trust_xfcc,
            metrics=self.metrics,
        )

    def start(self) -> None:
        if self.policy is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.policy.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
