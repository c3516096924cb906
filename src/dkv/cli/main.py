"""The ``dkv`` command: operator and developer tasks (``dkv certs`` now; more to come)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dkv.errors import DkvError
from dkv.security.certs import write_dev_pki

app = typer.Typer(help="dkv: a replicated, sharded key-value store.", no_args_is_help=True)


@app.callback()
def _root() -> None:
    """dkv operator and developer commands."""


@app.command()
def certs(
    out: Annotated[Path, typer.Option(help="Directory for the CA and certificates.")] = Path(
        ".dkv/certs"
    ),
    node: Annotated[
        list[str] | None, typer.Option(help="A storage node name (repeatable).")
    ] = None,
    client: Annotated[
        list[str] | None, typer.Option(help="A client identity, e.g. admin (repeatable).")
    ] = None,
    component: Annotated[
        list[str] | None,
        typer.Option(help="Another component as kind/name, e.g. gateway/gw1 (repeatable)."),
    ] = None,
    dns: Annotated[list[str] | None, typer.Option(help="Extra DNS SAN for every leaf.")] = None,
    force: Annotated[bool, typer.Option(help="Replace existing CA and certificates.")] = False,
) -> None:
    """Make a local CA and mTLS certificates for development (cert-manager does this in
    Kubernetes). Existing files are kept unless --force."""
    names = [("node", n) for n in (node or ["n1", "n2", "n3"])]
    names += [("client", c) for c in (client or ["admin"])]
    for spec in component or []:
        kind, sep, name = spec.partition("/")
        if not sep or not kind or not name:
            typer.echo(f"error: --component wants kind/name, got {spec!r}", err=True)
            raise typer.Exit(2)
        names.append((kind, name))
    try:
        written = write_dev_pki(out, names, force=force, extra_dns=dns or [])
    except (DkvError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    if written:
        typer.echo(f"wrote {len(written)} files to {out}:")
        for p in written:
            typer.echo(f"  {p}")
    else:
        typer.echo(f"certificates in {out} are up to date (use --force to replace them)")
