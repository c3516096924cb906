"""``dkvctl``: the command-line client. Table output by default, ``-o json`` for scripts.

Exit codes: 0 success, 1 the cluster said no or could not answer (message on stderr),
2 usage error, 3 a conditional write or a get found nothing (``get`` of a missing key).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from dkv.cli.auth import auth_app
from dkv.client import Client, ClientTls
from dkv.client.membership import MembershipClient
from dkv.cluster_health import ShardHealth, shard_health
from dkv.errors import DkvError, InvalidArgument, Unimplemented
from dkv.keys import prefix_end
from dkv.v1 import admin_pb2, cluster_pb2, kv_pb2
from dkv.v1 import membership_pb2 as mpb

app = typer.Typer(help="dkvctl: talk to a dkv cluster.", no_args_is_help=True)


@dataclass
class Opts:
    endpoints: list[str]
    output: str
    timeout_s: float
    tls: ClientTls | None


@app.callback()
def _root(
    ctx: typer.Context,
    endpoints: Annotated[
        str,
        typer.Option(
            "--endpoints",
            "--endpoint",
            envvar="DKVCTL_ENDPOINTS",
            help="Comma-separated host:port list: the front door (Envoy) by default, or "
            "storage nodes directly (member, status, leader and snapshot need nodes).",
        ),
    ] = "127.0.0.1:2379",
    output: Annotated[str, typer.Option("-o", "--output", help="table or json")] = "table",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for an answer.")] = 5.0,
    cacert: Annotated[str | None, typer.Option(envvar="DKVCTL_CACERT")] = None,
    cert: Annotated[str | None, typer.Option(envvar="DKVCTL_CERT")] = None,
    key: Annotated[str | None, typer.Option(envvar="DKVCTL_KEY")] = None,
) -> None:
    if output not in ("table", "json"):
        raise typer.BadParameter("must be 'table' or 'json'", param_hint="--output")
    tls = None
    if cacert or cert or key:
        if not (cacert and cert and key):
            raise typer.BadParameter("--cacert, --cert and --key go together")
        tls = ClientTls(cert, key, cacert)
    eps = [e.strip() for e in endpoints.split(",") if e.strip()]
    if not eps:
        raise typer.BadParameter("at least one endpoint", param_hint="--endpoints")
    ctx.obj = Opts(eps, output, timeout, tls)


def _tls_hint(opts: Opts, exc: Exception) -> str:
    """A server that speaks TLS closes a plaintext connection at once: say what to do."""
    if opts.tls is None and "Socket closed" in str(exc):
        return (
            "\n(the endpoint may require mTLS: give --cacert, --cert and --key, or set "
            "DKVCTL_CACERT, DKVCTL_CERT and DKVCTL_KEY; `make run` prints them)"
        )
    return ""


def _run(ctx: typer.Context, work: Any) -> Any:
    """Run ``work(client)``; a dkv error becomes a one-line message and exit code 1."""
    opts: Opts = ctx.obj

    async def go() -> Any:
        client = Client(opts.endpoints, opts.tls, opts.timeout_s)
        try:
            return await work(client)
        finally:
            await client.close()

    try:
        return asyncio.run(go())
    except DkvError as exc:
        typer.echo(f"Error: {exc}{_tls_hint(opts, exc)}", err=True)
        raise typer.Exit(1) from exc
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _kv_dict(kv: kv_pb2.KeyValue) -> dict[str, Any]:
    return {
        "key": kv.key.decode(errors="backslashreplace"),
        "value": kv.value.decode(errors="backslashreplace"),
        "create_revision": kv.create_revision,
        "mod_revision": kv.mod_revision,
        "version": kv.version,
    }


def _print_kvs(opts: Opts, kvs: list[kv_pb2.KeyValue], extra: dict[str, Any]) -> None:
    rows = [_kv_dict(kv) for kv in kvs]
    if opts.output == "json":
        typer.echo(json.dumps({"kvs": rows, **extra}))
        return
    if not rows:
        return
    cols = ["key", "value", "mod_revision", "version"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    typer.echo("  ".join(c.upper().ljust(widths[c]) for c in cols))
    for r in rows:
        typer.echo("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


@app.command()
def put(
    ctx: typer.Context,
    key: str,
    value: str,
    request_id: Annotated[
        str | None, typer.Option(help="Idempotency id (default: a fresh one per call).")
    ] = None,
) -> None:
    """Write KEY=VALUE."""
    rid = request_id or uuid.uuid4().hex
    resp: kv_pb2.PutResponse = _run(ctx, lambda c: c.put(key.encode(), value.encode(), rid))
    opts: Opts = ctx.obj
    if opts.output == "json":
        typer.echo(json.dumps({"revision": resp.header.revision, "succeeded": resp.succeeded}))
    else:
        typer.echo(f"OK (revision {resp.header.revision})")


@app.command()
def get(
    ctx: typer.Context,
    key: str,
    serializable: Annotated[bool, typer.Option(help="Read locally, possibly stale.")] = False,
) -> None:
    """Read one key (linearizable by default). Exit code 3 if it does not exist."""
    resp: kv_pb2.RangeResponse = _run(ctx, lambda c: c.get(key.encode(), serializable))
    opts: Opts = ctx.obj
    if opts.output == "table" and resp.kvs:
        typer.echo(resp.kvs[0].value.decode(errors="backslashreplace"))
    else:
        _print_kvs(opts, list(resp.kvs), {"revision": resp.header.revision})
    if not resp.kvs:
        if opts.output == "table":
            typer.echo(f"key {key!r} not found", err=True)
        raise typer.Exit(3)


@app.command("del")
def delete(
    ctx: typer.Context,
    key: str,
    end: Annotated[str | None, typer.Argument(help="Delete [KEY, END) instead.")] = None,
    prefix: Annotated[bool, typer.Option(help="Delete every key starting with KEY.")] = False,
) -> None:
    """Delete one key, a range [KEY, END), or --prefix; prints how many keys were deleted."""
    if prefix and end is not None:
        raise typer.BadParameter("give END or --prefix, not both")
    # (A prefix of only 0xff bytes has no end key: delete to the end of the key space.)
    single_or_range = end.encode() if end else b""
    range_end = (prefix_end(key.encode()) or b"\x00") if prefix else single_or_range
    rid = uuid.uuid4().hex
    resp: kv_pb2.DeleteResponse = _run(ctx, lambda c: c.delete(key.encode(), rid, range_end))
    opts: Opts = ctx.obj
    if opts.output == "json":
        typer.echo(json.dumps({"deleted": resp.deleted, "revision": resp.header.revision}))
    else:
        typer.echo(str(resp.deleted))


@app.command("range")
def range_(
    ctx: typer.Context,
    start: Annotated[str | None, typer.Argument(help="First key (inclusive).")] = None,
    end: Annotated[str | None, typer.Argument(help="End key (exclusive).")] = None,
    prefix: Annotated[str | None, typer.Option(help="Every key with this prefix.")] = None,
    limit: Annotated[int, typer.Option(help="Keys per page.")] = 1000,
    all_pages: Annotated[bool, typer.Option("--all", help="Follow continuations.")] = False,
    serializable: Annotated[bool, typer.Option()] = False,
) -> None:
    """List keys: --prefix P, or START [END] (END defaults to "every key after START")."""
    if prefix is None and start is None:
        raise typer.BadParameter("give --prefix or a start key")
    consistency = (
        kv_pb2.READ_CONSISTENCY_SERIALIZABLE
        if serializable
        else kv_pb2.READ_CONSISTENCY_LINEARIZABLE
    )

    async def work(c: Client) -> tuple[list[kv_pb2.KeyValue], bool]:
        out: list[kv_pb2.KeyValue] = []
        cont = b""
        while True:
            req = kv_pb2.RangeRequest(limit=limit, consistency=consistency, continuation=cont)
            if prefix is not None:
                req.prefix = prefix.encode()
            else:
                assert start is not None
                req.key = start.encode()
                req.range_end = end.encode() if end else b"\x00"
            page = await c.range(req)
            out.extend(page.kvs)
            if not page.more or not all_pages:
                return out, page.more
            cont = page.continuation

    kvs, more = _run(ctx, work)
    _print_kvs(ctx.obj, kvs, {"more": more})


@app.command()
def watch(
    ctx: typer.Context,
    key: Annotated[str | None, typer.Argument(help="The key to watch.")] = None,
    prefix: Annotated[str | None, typer.Option(help="Watch every key with this prefix.")] = None,
    rev: Annotated[int, typer.Option(help="Start at this revision (default: from now).")] = 0,
    prev_kv: Annotated[bool, typer.Option(help="Include the previous value.")] = False,
    max_events: Annotated[
        int, typer.Option(help="Stop after this many events (0: until Ctrl-C).")
    ] = 0,
) -> None:
    """Print changes as they happen: `PUT key value` / `DELETE key` lines (or JSON lines).

    Follows the cluster through failures: resumes on another endpoint without gaps."""
    if (key is None) == (prefix is None):
        raise typer.BadParameter("give a key or --prefix (one of them)")
    req = kv_pb2.WatchRequest(start_revision=rev, prev_kv=prev_kv)
    if prefix is not None:
        req.prefix = prefix.encode()
    else:
        assert key is not None
        req.key = key.encode()
    opts: Opts = ctx.obj

    async def work(c: Client) -> None:
        seen = 0
        async for resp in c.watch(req):
            if resp.compacted:
                typer.echo(
                    f"Error: revision {rev} was compacted; the oldest available is "
                    f"{resp.compact_revision + 1}",
                    err=True,
                )
                raise typer.Exit(1)
            for ev in resp.events:
                kind = "DELETE" if ev.type == kv_pb2.Event.EVENT_TYPE_DELETE else "PUT"
                if opts.output == "json":
                    typer.echo(json.dumps({"type": kind, **_kv_dict(ev.kv)}))
                elif kind == "PUT":
                    k = ev.kv.key.decode(errors="backslashreplace")
                    typer.echo(f"PUT {k} {ev.kv.value.decode(errors='backslashreplace')}")
                else:
                    typer.echo(f"DELETE {ev.kv.key.decode(errors='backslashreplace')}")
                seen += 1
                if max_events and seen >= max_events:
                    return

    _run(ctx, work)


# -- cluster administration -----------------------------------------------------------------

member_app = typer.Typer(help="List and change the cluster's members.", no_args_is_help=True)
leader_app = typer.Typer(help="Shard leadership.", no_args_is_help=True)
app.add_typer(member_app, name="member")
app.add_typer(leader_app, name="leader")

_ROLES = {
    admin_pb2.ROLE_FOLLOWER: "follower",
    admin_pb2.ROLE_CANDIDATE: "candidate",
    admin_pb2.ROLE_PRE_CANDIDATE: "pre-candidate",
    admin_pb2.ROLE_LEADER: "leader",
    admin_pb2.ROLE_LEARNER: "learner",
    admin_pb2.ROLE_REMOVED: "removed",
}


def _table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    if not rows:
        return
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    typer.echo("  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip())
    for r in rows:
        typer.echo("  ".join(str(r[c]).ljust(widths[c]) for c in cols).rstrip())


def _member_dict(m: admin_pb2.Member) -> dict[str, Any]:
    return {
        "id": f"{m.id:x}",
        "name": m.name,
        "status": "learner" if m.is_learner else "voter",
        "peer_address": m.peer_address,
        "client_address": m.client_address,
        "shards": list(m.shard_ids),
    }


def _print_members(opts: Opts, members: list[admin_pb2.Member]) -> None:
    rows = [_member_dict(m) for m in members]
    if opts.output == "json":
        typer.echo(json.dumps({"members": rows}))
    else:
        _table(rows, ["id", "name", "status", "peer_address", "client_address"])


async def _resolve(c: Client, who: str) -> int:
    """A member given by name or hex id."""
    members = await c.member_list()
    for m in members:
        if who in (m.name, f"{m.id:x}"):
            return m.id
    names = ", ".join(f"{m.name} ({m.id:x})" for m in members)
    raise InvalidArgument(f"no member named {who!r}; members are {names}")


@member_app.command("list")
def member_list(
    ctx: typer.Context,
    serializable: Annotated[bool, typer.Option(help="Answer from the node's state.")] = False,
) -> None:
    """Every member with its status (voter or learner) and addresses."""
    members = _run(ctx, lambda c: c.member_list(serializable))
    _print_members(ctx.obj, members)


@member_app.command("add")
def member_add(
    ctx: typer.Context,
    name: str,
    peer_url: Annotated[str, typer.Option("--peer-url", help="The new member's peer host:port.")],
) -> None:
    """Add NAME as a learner in every shard; then start it with --initial-cluster-state
    existing, and promote it once it caught up."""
    resp: admin_pb2.MemberAddResponse = _run(ctx, lambda c: c.member_add(name, peer_url))
    opts: Opts = ctx.obj
    if opts.output == "json":
        typer.echo(json.dumps({"member": _member_dict(resp.member)}))
        return
    initial = ",".join(f"{m.name}={m.peer_address}" for m in resp.members if m.name)
    typer.echo(f"Member {resp.member.id:x} ({name}) added as a learner. Start it with:")
    typer.echo(
        f"  dkv-node --name {name} --listen-peer {peer_url} "
        f"--initial-cluster {initial} --initial-cluster-state existing"
    )


def _change_member(ctx: typer.Context, member: str, change: str, done: str) -> None:
    """Resolve MEMBER (name or hex id), apply ``Client.member_<change>``, report."""

    async def work(c: Client) -> list[admin_pb2.Member]:
        members: list[admin_pb2.Member] = await getattr(c, f"member_{change}")(
            await _resolve(c, member)
        )
        return members

    members = _run(ctx, work)
    if ctx.obj.output == "json":
        _print_members(ctx.obj, members)
    else:
        typer.echo(f"Member {member} {done}.")


@member_app.command("promote")
def member_promote(ctx: typer.Context, member: str) -> None:
    """Make a learner (name or hex id) a voter; refused while it lags."""
    _change_member(ctx, member, "promote", "promoted to voter")


@member_app.command("remove")
def member_remove(ctx: typer.Context, member: str) -> None:
    """Remove a member (name or hex id) from every shard."""
    _change_member(ctx, member, "remove", "removed")


@leader_app.command("transfer")
def leader_transfer(
    ctx: typer.Context,
    to: Annotated[
        str | None, typer.Option(help="Member (name or hex id); default: most up to date.")
    ] = None,
    shard: Annotated[int, typer.Option(help="Shard id (0: every shard).")] = 0,
) -> None:
    """Hand shard leadership to another voter (thesis §3.10)."""

    async def work(c: Client) -> dict[int, int]:
        target = await _resolve(c, to) if to else 0
        if shard:
            shards = [shard]
        else:
            st = await c.status(c.endpoints[0])
            shards = [s.shard_id for s in st.shards]
        out: dict[int, int] = {}
        for sid in shards:
            out.update(await c.transfer_leadership(sid, target))
        return out

    leaders: dict[int, int] = _run(ctx, work)
    opts: Opts = ctx.obj
    if opts.output == "json":
        typer.echo(json.dumps({"leaders": {str(k): f"{v:x}" for k, v in leaders.items()}}))
    else:
        for sid, lid in sorted(leaders.items()):
            typer.echo(f"shard {sid}: leader is now {lid:x}")


_STATES = {
    mpb.NODE_STATE_UP: "up",
    mpb.NODE_STATE_DOWN: "down",
    mpb.NODE_STATE_LEAVING: "leaving",
}


def _cluster_rows(
    resp: cluster_pb2.ClusterStatusResponse,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """Node rows, shard rows (health as the dashboards classify it) and problems."""
    m = resp.map
    nodes = {n.id: n for n in m.nodes}
    leaders = {e.shard_id: e for e in m.leaders}
    reports = {r.node_id: r for r in resp.nodes}
    problems: list[str] = []
    node_rows = []
    for n in m.nodes:
        r = reports.get(n.id)
        leads = 0
        if r is not None and r.HasField("status"):
            leads = sum(1 for sh in r.status.shards if sh.role == admin_pb2.ROLE_LEADER)
        error = r.error if r is not None else "no report"
        if error:
            problems.append(f"node {n.name} ({n.id:x}): {error}")
        node_rows.append(
            {
                "id": f"{n.id:x}",
                "name": n.name,
                "state": _STATES.get(n.state, str(n.state)),
                "address": n.client_address,
                "leads": leads,
                "db_size": r.status.db_size_bytes
                if r is not None and r.HasField("status")
                else "-",
                "error": error or "-",
            }
        )
    shard_rows = []
    for sh in m.shards:
        health = shard_health(sh, nodes, leaders)
        entry = leaders.get(sh.id)
        leader = entry.leader_id if entry is not None else 0
        seen: admin_pb2.ShardStatus | None = None
        lr = reports.get(leader)
        if lr is not None and lr.HasField("status"):
            seen = next((x for x in lr.status.shards if x.shard_id == sh.id), None)
        if health is not ShardHealth.HEALTHY:
            problems.append(f"shard {sh.id}: {health.value.replace('_', ' ')}")
        shard_rows.append(
            {
                "shard": sh.id,
                "health": health.value,
                "leader": f"{leader:x}" if leader else "-",
                "term": entry.term if entry is not None else "-",
                "voters": ",".join(f"{v:x}" for v in sh.voters) or "-",
                "learners": ",".join(f"{v:x}" for v in sh.learners) or "-",
                "commit": seen.commit_index if seen is not None else "-",
                "applied": seen.applied_index if seen is not None else "-",
            }
        )
    return node_rows, shard_rows, problems


def _print_cluster_status(opts: Opts, resp: cluster_pb2.ClusterStatusResponse) -> None:
    node_rows, shard_rows, problems = _cluster_rows(resp)
    states = Counter(r["state"] for r in node_rows)
    health = Counter(r["health"] for r in shard_rows)
    if opts.output == "json":
        typer.echo(
            json.dumps(
                {
                    "map_version": resp.map.version,
                    "map_age_ms": resp.map_age_ms,
                    "nodes": node_rows,
                    "shards": shard_rows,
                    "summary": {
                        "nodes": {s: states.get(s, 0) for s in _STATES.values()},
                        "shards": {h.value: health.get(h.value, 0) for h in ShardHealth},
                    },
                    "errors": problems,
                }
            )
        )
    else:
        typer.echo(
            f"cluster map version {resp.map.version} (last changed {resp.map_age_ms / 1000:.1f} s "
            f"ago): {len(node_rows)} nodes ("
            + ", ".join(f"{states.get(s, 0)} {s}" for s in _STATES.values())
            + f"), {len(shard_rows)} shards ("
            + ", ".join(
                f"{health.get(h.value, 0)} {h.value.replace('_', ' ')}" for h in ShardHealth
            )
            + ")"
        )
        typer.echo("")
        _table(node_rows, list(node_rows[0]) if node_rows else [])
        typer.echo("")
        _table(shard_rows, list(shard_rows[0]) if shard_rows else [])
    for p in problems:
        typer.echo(f"Error: {p}", err=True)
    if problems:
        raise typer.Exit(1)


@app.command()
def status(ctx: typer.Context) -> None:
    """The cluster's health: through the front door (a gateway), every node and shard as the
    dashboards show them; at storage nodes, each endpoint's view of itself (role, term, leader,
    indexes, log and DB size per shard). Exit code 1 when a node does not answer or a shard has
    no leader or is under-replicated."""
    opts: Opts = ctx.obj

    async def cluster(c: Client) -> cluster_pb2.ClusterStatusResponse | None:
        try:
            return await c.cluster_status(opts.endpoints[0])
        except Unimplemented:
            return None  # a storage node: ask each endpoint about itself

    resp = _run(ctx, cluster)
    if resp is not None:
        _print_cluster_status(opts, resp)
        return

    async def work(c: Client) -> list[tuple[str, admin_pb2.StatusResponse | str]]:
        async def one(ep: str) -> tuple[str, admin_pb2.StatusResponse | str]:
            try:
                return ep, await c.status(ep)
            except DkvError as exc:
                return ep, str(exc)

        return list(await asyncio.gather(*(one(ep) for ep in opts.endpoints)))

    results = _run(ctx, work)
    rows: list[dict[str, Any]] = []
    errors = []
    for ep, st in results:
        if isinstance(st, str):
            errors.append(f"{ep}: {st}")
            continue
        for sh in st.shards:
            rows.append(
                {
                    "endpoint": ep,
                    "id": f"{st.member_id:x}",
                    "name": st.name,
                    "shard": sh.shard_id,
                    "role": _ROLES.get(sh.role, str(sh.role)),
                    "term": sh.term,
                    "leader": f"{sh.leader_id:x}" if sh.leader_id else "-",
                    "commit": sh.commit_index,
                    "applied": sh.applied_index,
                    "log_entries": sh.log_entries,
                    "snapshot": sh.snapshot_index,
                    "revision": sh.revision,
                    "db_size": st.db_size_bytes,
                }
            )
    if opts.output == "json":
        typer.echo(json.dumps({"shards": rows, "errors": errors}))
    else:
        _table(rows, list(rows[0]) if rows else [])
    for e in errors:
        typer.echo(f"Error: {e}", err=True)
    if errors:
        raise typer.Exit(1)


@app.command()
def snapshot(
    ctx: typer.Context,
    shard: Annotated[int, typer.Option(help="Shard id (0: every shard).")] = 0,
) -> None:
    """Make the first endpoint snapshot its shards now (and compact their logs)."""
    opts: Opts = ctx.obj
    out: dict[int, int] = _run(ctx, lambda c: c.snapshot(opts.endpoints[0], shard))
    if opts.output == "json":
        typer.echo(json.dumps({"snapshot_index": {str(k): v for k, v in out.items()}}))
    else:
        for sid, idx in sorted(out.items()):
            typer.echo(f"shard {sid}: snapshot at index {idx}")


# -- the cluster map, from the membership service -------------------------------------------

cluster_app = typer.Typer(
    help="The cluster map from the membership service: nodes, shards, leaders, slots.",
    no_args_is_help=True,
)
app.add_typer(cluster_app, name="cluster")
app.add_typer(auth_app, name="auth")

_NODE_STATES = {
    mpb.NODE_STATE_UP: "up",
    mpb.NODE_STATE_DOWN: "down",
    mpb.NODE_STATE_LEAVING: "leaving",
}


@dataclass
class ClusterOpts:
    opts: Opts
    membership: list[str]


@cluster_app.callback()
def _cluster_root(
    ctx: typer.Context,
    membership: Annotated[
        str,
        typer.Option(
            envvar="DKVCTL_MEMBERSHIP",
            help="Comma-separated host:port list of the membership service's replicas.",
        ),
    ] = "127.0.0.1:2479",
) -> None:
    eps = [e.strip() for e in membership.split(",") if e.strip()]
    if not eps:
        raise typer.BadParameter("at least one endpoint", param_hint="--membership")
    ctx.obj = ClusterOpts(ctx.obj, eps)


def _cluster_map(ctx: typer.Context) -> mpb.ClusterMap:
    """Fetch the map (linearizable, any replica); unreachable or refused: message, exit 1."""
    co: ClusterOpts = ctx.obj

    async def go() -> mpb.ClusterMap:
        async with MembershipClient(co.membership, co.opts.tls, co.opts.timeout_s) as mc:
            return await mc.get_cluster_map()

    try:
        return asyncio.run(go())
    except DkvError as exc:
        typer.echo(f"Error: membership service ({', '.join(co.membership)}): {exc}", err=True)
        raise typer.Exit(1) from exc
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _node_name(m: mpb.ClusterMap, node_id: int) -> str:
    for n in m.nodes:
        if n.id == node_id:
            return n.name
    return f"{node_id:x}"


def _ago(unix_ms: int, now_ms: int) -> str:
    if not unix_ms:
        return "-"
    s = max(0, now_ms - unix_ms) / 1000
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60)}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60)}m"


def _nodes_rows(m: mpb.ClusterMap) -> list[dict[str, Any]]:
    now_ms = time.time_ns() // 1_000_000
    return [
        {
            "id": f"{n.id:x}",
            "name": n.name,
            "state": _NODE_STATES.get(n.state, str(n.state)),
            "zone": n.zone,
            "peer": n.peer_address,
            "client": n.client_address,
            "labels": dict(sorted(n.labels.items())),
            "last_heartbeat_unix_ms": n.last_heartbeat_unix_ms,
            "last_heartbeat_ago": _ago(n.last_heartbeat_unix_ms, now_ms),
        }
        for n in m.nodes
    ]


def _shards_rows(m: mpb.ClusterMap) -> list[dict[str, Any]]:
    leaders = {e.shard_id: e for e in m.leaders}
    rows = []
    for s in m.shards:
        e = leaders.get(s.id)
        rows.append(
            {
                "shard": s.id,
                "epoch": s.epoch,
                "voters": [_node_name(m, i) for i in s.voters],
                "learners": [_node_name(m, i) for i in s.learners],
                "leader": _node_name(m, e.leader_id) if e and e.leader_id else None,
                "term": e.term if e else None,
            }
        )
    return rows


def _slots_rows(m: mpb.ClusterMap) -> list[dict[str, Any]]:
    """Adjacent ranges of one shard merged; ``end`` exclusive, as in the proto."""
    rows: list[dict[str, Any]] = []
    for r in sorted(m.slot_ranges, key=lambda r: r.start):
        if rows and rows[-1]["shard"] == r.shard_id and rows[-1]["end"] == r.start:
            rows[-1]["end"] = r.end
        else:
            rows.append({"start": r.start, "end": r.end, "shard": r.shard_id})
    return rows


def _print_nodes(rows: list[dict[str, Any]]) -> None:
    if not rows:
        typer.echo("(no nodes registered)")
        return
    _table(rows, ["id", "name", "state", "zone", "peer", "client", "last_heartbeat_ago"])


def _print_shards(rows: list[dict[str, Any]]) -> None:
    if not rows:
        typer.echo("(cluster not initialized: no shards yet)")
        return
    _table(
        [
            {
                **r,
                "voters": ",".join(r["voters"]) or "-",
                "learners": ",".join(r["learners"]) or "-",
                "leader": r["leader"] or "-",
                "term": "-" if r["term"] is None else r["term"],
            }
            for r in rows
        ],
        ["shard", "epoch", "voters", "learners", "leader", "term"],
    )


def _print_slots(rows: list[dict[str, Any]]) -> None:
    if not rows:
        typer.echo("(cluster not initialized: no slot table yet)")
        return
    _table(
        [{"slots": f"{r['start']}-{r['end'] - 1}", "shard": r["shard"]} for r in rows],
        ["slots", "shard"],
    )


def _cluster_output(ctx: typer.Context) -> str:
    co: ClusterOpts = ctx.obj
    return co.opts.output


@cluster_app.command("nodes")
def cluster_nodes(ctx: typer.Context) -> None:
    """Registered nodes: id (hex), name, state, zone, addresses, time since last heartbeat."""
    m = _cluster_map(ctx)
    rows = _nodes_rows(m)
    if _cluster_output(ctx) == "json":
        typer.echo(json.dumps({"version": m.version, "nodes": rows}))
    else:
        _print_nodes(rows)


@cluster_app.command("shards")
def cluster_shards(ctx: typer.Context) -> None:
    """Shards: epoch, voters, learners, last reported leader and its term (node names)."""
    m = _cluster_map(ctx)
    rows = _shards_rows(m)
    if _cluster_output(ctx) == "json":
        typer.echo(json.dumps({"version": m.version, "shards": rows}))
    else:
        _print_shards(rows)


@cluster_app.command("slots")
def cluster_slots(ctx: typer.Context) -> None:
    """The slot table as ranges START-END (inclusive) -> shard (JSON: ``end`` exclusive)."""
    m = _cluster_map(ctx)
    rows = _slots_rows(m)
    if _cluster_output(ctx) == "json":
        typer.echo(json.dumps({"version": m.version, "slot_ranges": rows}))
    else:
        _print_slots(rows)


@cluster_app.command("drain")
def cluster_drain(
    ctx: typer.Context,
    node: Annotated[str, typer.Argument(help="Node name or hex id.")],
) -> None:
    """Drain a node: membership moves its replicas to other nodes, then removes it from the
    map for good (it cannot register again under its name; watch `cluster shards`). Stop the
    node's process once it is gone from `cluster nodes`. A drain that would leave fewer nodes
    than the replication factor waits for a new node."""
    co: ClusterOpts = ctx.obj
    m = _cluster_map(ctx)
    match = [n for n in m.nodes if n.name == node or f"{n.id:x}" == node.lower()]
    if not match:
        typer.echo(f"Error: no node {node!r} in the cluster map", err=True)
        raise typer.Exit(1)

    async def go() -> mpb.Node:
        async with MembershipClient(co.membership, co.opts.tls, co.opts.timeout_s) as mc:
            return await mc.leave_node(match[0].id)

    try:
        left = asyncio.run(go())
    except DkvError as exc:
        typer.echo(f"Error: membership service ({', '.join(co.membership)}): {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"draining {left.name} ({left.id:x}): its replicas move to other nodes")


def _replicas_out(ctx: typer.Context, replicas: list[mpb.Replica]) -> None:
    co: ClusterOpts = ctx.obj
    rows = [
        {
            "id": f"{r.id:x}",
            "name": r.name,
            "role": "learner" if r.is_learner else "voter",
            "peer": r.peer_address,
            "client": r.client_address,
        }
        for r in replicas
    ]
    if co.opts.output == "json":
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        typer.echo(f"{r['name']:<12} {r['id']:<18} {r['role']:<8} {r['peer']:<22} {r['client']}")


def _membership_call(ctx: typer.Context, work: Any) -> Any:
    co: ClusterOpts = ctx.obj

    async def go() -> Any:
        async with MembershipClient(co.membership, co.opts.tls, co.opts.timeout_s) as mc:
            return await work(mc)

    try:
        return asyncio.run(go())
    except DkvError as exc:
        typer.echo(f"Error: membership service ({', '.join(co.membership)}): {exc}", err=True)
        raise typer.Exit(1) from exc


@cluster_app.command("replica-add")
def cluster_replica_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The new membership replica's name.")],
    peer_url: Annotated[str, typer.Argument(help="Its peer host:port.")],
) -> None:
    """Add a membership replica: start it first with --initial-cluster-state existing (and the
    current replicas plus itself in --initial-cluster); it joins as a learner, catches up, and
    becomes a voter. Use a longer --timeout if the map is large."""
    _replicas_out(ctx, _membership_call(ctx, lambda mc: mc.add_replica(name, peer_url)))


@cluster_app.command("replica-remove")
def cluster_replica_remove(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The membership replica to remove.")],
) -> None:
    """Remove a membership replica (stop its process afterwards)."""
    _replicas_out(ctx, _membership_call(ctx, lambda mc: mc.remove_replica(name)))


@cluster_app.command("show")
def cluster_show(ctx: typer.Context) -> None:
    """The whole map: version, nodes, shards and slots."""
    m = _cluster_map(ctx)
    nodes, shards, slots = _nodes_rows(m), _shards_rows(m), _slots_rows(m)
    if _cluster_output(ctx) == "json":
        typer.echo(
            json.dumps(
                {"version": m.version, "nodes": nodes, "shards": shards, "slot_ranges": slots}
            )
        )
        return
    typer.echo(f"Cluster map version {m.version}")
    typer.echo("")
    typer.echo("Nodes:")
    _print_nodes(nodes)
    typer.echo("")
    typer.echo("Shards:")
    _print_shards(shards)
    typer.echo("")
    typer.echo("Slots:")
    _print_slots(slots)


def main() -> None:
    app()


__all__ = ["app", "main"]


if __name__ == "__main__":
    main()
