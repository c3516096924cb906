"""Every listening port of `make run`'s stack refuses every caller it should (issue 11).

One real stack (``DevStack``: Envoy, the gateway, membership, three nodes, mTLS, the default
policy). For every port — the front door, the gateway's KV and xDS ports, membership's client
and peer ports, each node's client and peer ports — a *state-changing* call (a KV Put, a
``JoinNode`` or ``LeaveNode``, a Raft batch carrying a heartbeat of a huge term, an ADS
subscription) is made by:

- (a) plaintext: no TLS at all;
- (b) TLS without a client certificate;
- (c) a certificate of a foreign CA (made here) naming the identity the port *does* accept;
- (d) an expired certificate of the real CA (signed here with ``ca.key``) naming that identity;
- (f) a certificate of the real CA whose SPIFFE URI is of another trust domain
  (``spiffe://evil/...``) and whose CN is the accepted name: no identity, no CN fallback;
- (e1) a valid certificate of the real CA naming the wrong user (``user:mallory``, who has no
  grant, at the front door and the gateway; ``user:reader`` elsewhere);
- (e2) one naming the wrong component (a node through the front door, Envoy at a node, ...;
  for ``JoinNode`` as n1, node n2).

(a)-(d) must be UNAVAILABLE or UNAUTHENTICATED *and* refused by the TLS layer itself: a raw
TLS client (``tls_probe``) presenting the same credentials must get an alert or a closed
connection, never an HTTP/2 answer. (f) must be UNAUTHENTICATED, (e) PERMISSION_DENIED. The
table of what each port answered is printed (``-s``) and kept in docs/security.md
("Refusals by port"). Afterwards nothing changed: the canary key (each KV attempt also tries to
overwrite it), no key the attempts wrote exists, the nodes of the membership map (ids, names,
states, addresses) are the same, no Raft term reached the forged heartbeats' and no process
died.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import socket
import ssl
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from envoy.service.discovery.v3 import discovery_pb2
from peer_probe import hello_frame, peer_exchange
from prometheus_client.parser import text_string_to_metric_families
from test_access_stack import free_layout

from dkv.devstack import DevLayout, DevStack
from dkv.host.members import member_id
from dkv.security import write_dev_pki
from dkv.security.certs import Issued, issue_certificate, make_ca, uri_for
from dkv.v1 import kv_pb2, raft_pb2
from dkv.v1 import membership_pb2 as mpb

pytestmark = pytest.mark.slow

CALL_TIMEOUT_S = 10.0
CANARY = b"ports/canary"
CANARY_VALUE = b"written by the admin before the attacks"
ATTACK_PREFIX = b"attack/"
FORGED_TERM = 1 << 40  # a heartbeat of this term would make its receiver follow the sender
NODE_TOKEN = "dkv-cluster"  # dkv-node's --initial-cluster-token default
MEMBERSHIP_TOKEN = "dkv-membership"  # dkv-membership's

Code = grpc.StatusCode


# -- certificates ----------------------------------------------------------------------------------


def _pem(issued: Issued) -> tuple[bytes, bytes]:
    key = issued.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key, issued.cert.public_bytes(serialization.Encoding.PEM)


def load_ca(layout: DevLayout) -> Issued:
    key = serialization.load_pem_private_key(layout.certs.ca_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return Issued(key, x509.load_pem_x509_certificate(layout.certs.ca_cert.read_bytes()))


def expired_certificate(ca: Issued, common_name: str, uri: str) -> Issued:
    """A client certificate of ``ca`` for ``uri`` that expired yesterday (valid for one day,
    from two days ago); otherwise exactly what ``issue_certificate`` makes."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=2))
        .not_valid_after(now - dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.UniformResourceIdentifier(uri)]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    assert cert.not_valid_after_utc < now
    return Issued(key, cert)


@dataclass(frozen=True)
class Who:
    """An identity: ``kind`` and ``name`` as ``dkv certs`` spells them; ``name`` is also its
    certificate's file name in ROOT/certs (make run's names)."""

    kind: str
    name: str

    @property
    def uri(self) -> str:
        return uri_for(self.kind, self.name)


ADMIN = Who("user", "admin")
READER = Who("user", "reader")
MALLORY = Who("user", "mallory")
ENVOY = Who("envoy", "envoy")
GATEWAY = Who("gateway", "gw1")
M1 = Who("membership", "m1")
M2 = Who("membership", "m2")  # not running: a replica that could be added


def N(i: int) -> Who:  # the node's name reads as n1, n2, n3
    return Who("node", f"n{i}")


@dataclass(frozen=True)
class Cred:
    """What one attempt presents: nothing (``plaintext``), TLS without a certificate
    (``pem`` None), or a key and certificate (PEM)."""

    ca_pem: bytes
    plaintext: bool = False
    pem: tuple[bytes, bytes] | None = None  # (key, certificate)

    def channel(self, address: str) -> grpc.Channel:
        # A channel of its own (no subchannel shared with another attempt's credentials).
        options = [("grpc.use_local_subchannel_pool", 1)]
        if self.plaintext:
            return grpc.insecure_channel(address, options=options)
        key, cert = self.pem if self.pem is not None else (None, None)
        creds = grpc.ssl_channel_credentials(self.ca_pem, key, cert)
        return grpc.secure_channel(address, creds, options=options)


class Pki:
    """Client credentials for each attempt, for the identity a port accepts."""

    def __init__(self, layout: DevLayout) -> None:
        self.layout = layout
        self.ca_pem = layout.certs.ca_cert.read_bytes()
        self.ca = load_ca(layout)
        self.foreign_ca = make_ca("an attacker's CA")
        self._cache: dict[tuple[str, Who], tuple[bytes, bytes]] = {}

    def plaintext(self) -> Cred:
        return Cred(self.ca_pem, plaintext=True)

    def no_cert(self) -> Cred:
        return Cred(self.ca_pem)

    def real(self, who: Who) -> Cred:
        pki = self.layout.certs
        pem = (pki.key(who.name).read_bytes(), pki.cert(who.name).read_bytes())
        return Cred(self.ca_pem, pem=pem)

    def _made(self, what: str, who: Who, make: Callable[[], Issued]) -> Cred:
        if (what, who) not in self._cache:
            self._cache[what, who] = _pem(make())
        return Cred(self.ca_pem, pem=self._cache[what, who])

    def foreign(self, who: Who) -> Cred:
        return self._made(
            "foreign", who, lambda: issue_certificate(self.foreign_ca, who.name, uri=who.uri)
        )

    def expired(self, who: Who) -> Cred:
        return self._made("expired", who, lambda: expired_certificate(self.ca, who.name, who.uri))

    def other_domain(self, who: Who) -> Cred:
        uri = who.uri.replace("spiffe://dkv/", "spiffe://evil/", 1)
        return self._made("domain", who, lambda: issue_certificate(self.ca, who.name, uri=uri))


# -- what the TLS layer says -----------------------------------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")


def tls_probe(port: int, cred: Cred, scratch: Path) -> str:
    """How the TLS layer answers ``cred`` (the gRPC status hides it): a TLS alert (Envoy
    sends one), the connection closed without one (gRPC servers), or the HTTP/2 preface
    answered ("served": the handshake passed)."""
    if cred.plaintext:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(H2_PREFACE)
            reply = _recv(s)
        if reply[:1] == b"\x15":  # a TLS alert record, in clear
            return f"TLS alert {reply[-1]} in clear"
        return "closed" if not reply else f"answered {reply[:8]!r}"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=cred.ca_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    if cred.pem is not None:
        key, cert = scratch / "probe.key", scratch / "probe.crt"
        key.write_bytes(cred.pem[0])
        cert.write_bytes(cred.pem[1])
        ctx.load_cert_chain(cert, key)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as s,
            ctx.wrap_socket(s, server_hostname="127.0.0.1") as tls,
        ):
            # TLS 1.3: the client's side of the handshake ends before the server has judged
            # our certificate; its verdict (an alert or a close) is what comes next, or, if it
            # took us, the answer to our HTTP/2 preface.
            tls.settimeout(1.0)
            try:
                reply = _recv(tls)
            except TimeoutError:
                tls.settimeout(5.0)
                tls.sendall(H2_PREFACE)
                reply = _recv(tls)
    except ssl.SSLError as exc:
        alert = re.search(r"ALERT_([A-Z_]+)", exc.reason or "")
        if alert:
            return f"alert {alert.group(1).lower().replace('_', ' ')}"
        return f"{type(exc).__name__} {exc.reason or exc}"
    return "closed" if not reply else "served"


def _recv(s: socket.socket) -> bytes:
    try:
        return s.recv(64)
    except (ConnectionResetError, BrokenPipeError):
        return b""


# -- the calls -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    code: Code
    details: str
    tls: str = ""  # what tls_probe saw, for the attempts that must fail the handshake

    @property
    def cell(self) -> str:
        return f"{self.code.name}, TLS: {self.tls}" if self.tls else self.code.name


def outcome_of(call: Callable[[], object]) -> Outcome:
    try:
        call()
    except grpc.RpcError as exc:
        failed: Any = exc  # the call's status (grpc's errors are also its Call)
        return Outcome(failed.code(), failed.details() or "")
    return Outcome(Code.OK, "")


def _unary(ch: grpc.Channel, method: str, req: Any, resp: Any) -> Callable[[], object]:
    call: Any = ch.unary_unary(
        method, request_serializer=lambda m: m.SerializeToString(), response_deserializer=resp
    )
    return lambda: call(req, timeout=CALL_TIMEOUT_S)


# Synchronous gRPC: grpc.aio's stream calls report a write that raced the server's refusal
# as INTERNAL "Internal error from Core" instead of the server's status (grpc/grpc#36066).
Attack = Callable[[grpc.Channel, str], Outcome]


def kv_put() -> Attack:
    def attack(ch: grpc.Channel, tag: str) -> Outcome:
        put = "/dkv.v1.KV/Put"
        mine = kv_pb2.PutRequest(key=ATTACK_PREFIX + tag.encode(), value=b"evil")
        first = outcome_of(_unary(ch, put, mine, kv_pb2.PutResponse.FromString))
        canary = kv_pb2.PutRequest(key=CANARY, value=b"evil " + tag.encode())
        second = outcome_of(_unary(ch, put, canary, kv_pb2.PutResponse.FromString))
        if second.code is not first.code:
            return Outcome(first.code, f"{first.details}; then the canary: {second.code.name}")
        return first

    return attack


def join_node(node_id: Callable[[], int]) -> Attack:
    """n1 registers again with an attacker's addresses: had it been accepted, the gateway and
    the other nodes would send n1's traffic there."""

    def attack(ch: grpc.Channel, tag: str) -> Outcome:
        hijack = mpb.Node(
            id=node_id(), name="n1", peer_address="127.0.0.1:1", client_address="127.0.0.1:2"
        )
        m = "/dkv.v1.Membership/JoinNode"
        return outcome_of(
            _unary(ch, m, mpb.JoinNodeRequest(node=hijack), mpb.JoinNodeResponse.FromString)
        )

    return attack


def leave_node(node_id: Callable[[], int]) -> Attack:
    def attack(ch: grpc.Channel, tag: str) -> Outcome:
        req = mpb.LeaveNodeRequest(node_id=node_id())
        m = "/dkv.v1.Membership/LeaveNode"
        return outcome_of(_unary(ch, m, req, mpb.LeaveNodeResponse.FromString))

    return attack


@dataclass(frozen=True)
class PeerAttack:
    """An attack on a Raft peer port: it speaks the framed peer protocol (dkv.host.peer_wire),
    not gRPC, so it takes the attempt's credentials instead of a channel."""

    hello: bytes
    batch: raft_pb2.MessageBatch

    def __call__(self, cred: Cred, port: int) -> Outcome:
        got = peer_exchange(
            port,
            self.batch,
            self.hello,
            ca_pem=cred.ca_pem,
            pem=cred.pem,
            plaintext=cred.plaintext,
            timeout_s=CALL_TIMEOUT_S,
        )
        return Outcome(got.code, got.details)


def raft_heartbeat(cluster: str, sender: Who, receiver: Who) -> PeerAttack:
    """One batch with a heartbeat of FORGED_TERM from ``sender`` (a real member id) to shard 1
    (membership's one group is 1 too): had it been delivered, the receiver would have taken
    that term and followed the sender."""
    frm, to = member_id(cluster, sender.name), member_id(cluster, receiver.name)
    msg = raft_pb2.Message(type=raft_pb2.MESSAGE_TYPE_HEARTBEAT, to=to, term=FORGED_TERM)
    setattr(msg, "from", frm)  # `from` is a keyword
    batch = raft_pb2.MessageBatch(messages=[msg], from_node=frm, group_ids=[1], cluster_id=cluster)
    return PeerAttack(hello_frame(cluster, frm, sender.name), batch)


def ads_subscribe() -> Attack:
    def attack(ch: grpc.Channel, tag: str) -> Outcome:
        ads = ch.stream_stream(
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )
        req = discovery_pb2.DiscoveryRequest(
            type_url="type.googleapis.com/envoy.config.listener.v3.Listener"
        )
        req.node.id = "envoy"
        req.node.cluster = "dkv"
        call: Any = ads(iter([req]), timeout=CALL_TIMEOUT_S)
        try:
            # A first answer: a configuration was served to the impostor.
            return outcome_of(lambda: next(call))
        finally:
            call.cancel()

    return attack


@dataclass
class Target:
    """One port and the state-changing call made to it."""

    name: str
    port: int
    call: str
    attack: Attack | PeerAttack
    accepted: Who  # whom the port accepts for this call (forged in (c), (d), (f))
    wrong_user: Who
    wrong_component: Who
    cells: dict[str, Outcome] = field(default_factory=dict)


@dataclass(frozen=True)
class Attempt:
    column: str
    title: str
    credentials: Callable[[Pki, Target], Cred]
    expected: frozenset[Code]
    handshake_fails: bool  # the TLS layer itself must refuse it (tls_probe: not "served")


REFUSED = frozenset({Code.UNAVAILABLE, Code.UNAUTHENTICATED})
ATTEMPTS = [
    Attempt("a", "plaintext", lambda p, t: p.plaintext(), REFUSED, True),
    Attempt("b", "TLS, no client cert", lambda p, t: p.no_cert(), REFUSED, True),
    Attempt("c", "foreign CA", lambda p, t: p.foreign(t.accepted), REFUSED, True),
    Attempt("d", "expired", lambda p, t: p.expired(t.accepted), REFUSED, True),
    Attempt(
        "f",
        "spiffe://evil/...",
        lambda p, t: p.other_domain(t.accepted),
        frozenset({Code.UNAUTHENTICATED}),
        False,
    ),
    Attempt(
        "e1",
        "wrong user",
        lambda p, t: p.real(t.wrong_user),
        frozenset({Code.PERMISSION_DENIED}),
        False,
    ),
    Attempt(
        "e2",
        "wrong component",
        lambda p, t: p.real(t.wrong_component),
        frozenset({Code.PERMISSION_DENIED}),
        False,
    ),
]


def targets(layout: DevLayout, node_ids: dict[str, int]) -> list[Target]:
    leave = leave_node(lambda: node_ids["n3"])
    out = [
        Target("front door (Envoy)", layout.front_door, "KV/Put", kv_put(), ADMIN, MALLORY, N(1)),
        Target("gateway KV", layout.gateway, "KV/Put", kv_put(), ADMIN, MALLORY, N(1)),
        Target("gateway xDS", layout.xds, "ADS", ads_subscribe(), ENVOY, READER, GATEWAY),
        Target(
            "membership m1 client",
            layout.membership_client(1),
            "JoinNode (as n1)",
            join_node(lambda: node_ids["n1"]),
            N(1),
            READER,
            N(2),  # a node, but not n1
        ),
        Target(
            "membership m1 client",
            layout.membership_client(1),
            "LeaveNode (n3)",
            leave,
            ADMIN,
            READER,
            N(1),
        ),
        Target(
            "membership m1 peer",
            layout.membership_peer(1),
            "Raft batch",
            raft_heartbeat(MEMBERSHIP_TOKEN, M2, M1),
            M2,
            READER,
            N(1),
        ),
    ]
    for i in (1, 2, 3):
        other = N(i % 3 + 1)
        out.append(
            Target(
                f"node n{i} client",
                layout.node_client(i),
                "KV/Put",
                kv_put(),
                GATEWAY,
                READER,
                ENVOY,
            )
        )
        out.append(
            Target(
                f"node n{i} peer",
                layout.node_peer(i),
                "Raft batch",
                raft_heartbeat(NODE_TOKEN, other, N(i)),
                other,
                READER,
                M1,
            )
        )
    return out


def attempt(target: Target, how: Attempt, pki: Pki, scratch: Path) -> Outcome:
    cred = how.credentials(pki, target)
    if isinstance(target.attack, PeerAttack):
        got = target.attack(cred, target.port)
    else:
        with cred.channel(f"127.0.0.1:{target.port}") as ch:
            tag = f"{target.name}/{target.call}/{how.column}".replace(" ", "-")
            got = target.attack(ch, tag)
    if how.handshake_fails:
        got = Outcome(got.code, got.details, tls_probe(target.port, cred, scratch))
    return got


# -- the state that must not change ----------------------------------------------------------------


def admin_at(layout: DevLayout, port: int) -> grpc.Channel:
    pki = layout.certs
    creds = grpc.ssl_channel_credentials(
        pki.ca_cert.read_bytes(), pki.key("admin").read_bytes(), pki.cert("admin").read_bytes()
    )
    return grpc.secure_channel(f"127.0.0.1:{port}", creds)


@dataclass(frozen=True)
class State:
    canary: list[bytes]
    attack_keys: list[bytes]
    nodes: list[tuple[int, str, int, str, str]]
    retired: list[int]

    @property
    def node_ids(self) -> dict[str, int]:
        return {name: nid for nid, name, *_ in self.nodes}


def observe(layout: DevLayout) -> State:
    rng = "/dkv.v1.KV/Range"
    with admin_at(layout, layout.front_door) as door:
        got: Any = _unary(
            door, rng, kv_pb2.RangeRequest(key=CANARY), kv_pb2.RangeResponse.FromString
        )()
        canary = [kv.value for kv in got.kvs]
        got = _unary(
            door, rng, kv_pb2.RangeRequest(prefix=ATTACK_PREFIX), kv_pb2.RangeResponse.FromString
        )()
        attack_keys = [kv.key for kv in got.kvs]
    with admin_at(layout, layout.membership_client(1)) as membership:
        got = _unary(
            membership,
            "/dkv.v1.Membership/GetClusterMap",
            mpb.GetClusterMapRequest(),
            mpb.GetClusterMapResponse.FromString,
        )()
    nodes = [(n.id, n.name, int(n.state), n.peer_address, n.client_address) for n in got.map.nodes]
    return State(canary, attack_keys, nodes, list(got.map.retired_node_ids))


def highest_raft_term(layout: DevLayout) -> float:
    """The highest ``dkv_raft_term`` any node or membership replica reports."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    ports = [layout.node_metrics(i) for i in (1, 2, 3)] + [layout.membership_metrics(1)]
    highest = 0.0
    for port in ports:
        with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "dkv_raft_term":
                    highest = max(highest, s.value)
    return highest


# -- the test --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    layout = free_layout(tmp_path_factory.mktemp("ports") / ".dkv")
    # mallory: a valid certificate of the CA whom the policy grants nothing.
    write_dev_pki(layout.certs.directory, [("user", "mallory")])
    stack = DevStack(layout)
    try:
        stack.start()
        asyncio.run(stack.wait_ready())
        yield stack
    finally:
        stack.stop()


def table(rows: list[Target]) -> str:
    head = ["port", "call"] + [f"({a.column}) {a.title}" for a in ATTEMPTS]
    lines = [head]
    for t in rows:
        lines.append([t.name, t.call] + [t.cells[a.column].cell for a in ATTEMPTS])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    out = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in lines
    ]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def test_every_port_refuses_every_wrong_caller_and_nothing_changes(
    stack: DevStack, tmp_path: Path
) -> None:
    layout = stack.layout
    scratch = tmp_path

    with admin_at(layout, layout.front_door) as door:
        put = kv_pb2.PutRequest(key=CANARY, value=CANARY_VALUE)
        _unary(door, "/dkv.v1.KV/Put", put, kv_pb2.PutResponse.FromString)()
    before = observe(layout)
    assert before.canary == [CANARY_VALUE] and before.attack_keys == []
    assert {"n1", "n2", "n3"} <= set(before.node_ids)
    pki = Pki(layout)
    rows = targets(layout, before.node_ids)
    for t in rows:
        for how in ATTEMPTS:
            t.cells[how.column] = attempt(t, how, pki, scratch)
    after = observe(layout)
    print("\n" + table(rows))
    for a in ATTEMPTS:
        print(f"({a.column}) expected: {' or '.join(sorted(c.name for c in a.expected))}")

    wrong = [
        f"{t.name} {t.call} ({a.column}) {a.title}: {t.cells[a.column].code.name} "
        f"{t.cells[a.column].details!r}"
        for t in rows
        for a in ATTEMPTS
        if t.cells[a.column].code not in a.expected
        or (a.handshake_fails and t.cells[a.column].tls == "served")
    ]
    assert not wrong, "refused otherwise than expected:\n" + "\n".join(wrong)
    assert after.canary == [CANARY_VALUE]
    assert after.attack_keys == []
    assert after.nodes == before.nodes
    assert after.retired == before.retired
    assert highest_raft_term(layout) < FORGED_TERM
    assert stack.dead() is None, f"{stack.dead()} died"
