"""``dkvctl``: the command-line client. Table output by default, ``-o json`` for scripts.

Exit codes: 0 success, 1 the cluster said no or could not answer (message on stderr),
2 usage error, 3 a conditional write or a get found nothing (``get`` of a missing key).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from dkv.client import Client, ClientTls
from dkv.errors import DkvError
from dkv.v1 import kv_pb2

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
        str, typer.Option(envvar="DKVCTL_ENDPOINTS", help="Comma-separated host:port list.")
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


def _run(ctx: typer.Context, work: Any) -> Any:
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
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from exc


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
def delete(ctx: typer.Context, key: str) -> None:
    """Delete one key; prints how many keys were deleted (0 or 1)."""
    resp: kv_pb2.DeleteResponse = _run(ctx, lambda c: c.delete(key.encode(), uuid.uuid4().hex))
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


def main() -> None:
    app()


__all__ = ["app", "main"]
