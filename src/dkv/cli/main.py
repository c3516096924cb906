"""The ``dkv`` command: operator and developer tasks (``dkv certs``, ``dkv token``,
``dkv envoy-bootstrap``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dkv.errors import DkvError
from dkv.security.certs import write_dev_pki
from dkv.security.tokens import AUDIENCE, ISSUER, issue_token, write_token_keys

app = typer.Typer(help="dkv: a replicated, sharded key-value store.", no_args_is_help=True)


@app.callback()
def _root() -> None:
    """dkv operator and developer commands."""


@app.command()
def certs(
    kind: Annotated[
        str | None,
        typer.Argument(
            help="Issue just this one: user, node, membership, gateway or envoy (with NAME), "
            "e.g. `dkv certs user alice`."
        ),
    ] = None,
    name: Annotated[str | None, typer.Argument(help="The identity's name.")] = None,
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
    trust_domain: Annotated[
        str, typer.Option(help="The SPIFFE trust domain of the identities (spiffe://DOMAIN/...).")
    ] = "dkv",
) -> None:
    """Make a local CA and mTLS certificates for development (cert-manager does this in
    Kubernetes). Existing files are kept unless --force. Each certificate names its identity
    as a SPIFFE URI (spiffe://dkv/user/alice): see docs/security.md."""
    if kind is not None:
        if not name:
            typer.echo("error: give KIND and NAME, e.g. `dkv certs user alice`", err=True)
            raise typer.Exit(2)
        names = [(kind, name)]
    else:
        names = [("node", n) for n in (node or ["n1", "n2", "n3"])]
        names += [("client", c) for c in (client or ["admin"])]
    for spec in component or []:
        kind, sep, name = spec.partition("/")
        if not sep or not kind or not name:
            typer.echo(f"error: --component wants kind/name, got {spec!r}", err=True)
            raise typer.Exit(2)
        names.append((kind, name))
    try:
        written = write_dev_pki(
            out, names, force=force, extra_dns=dns or [], trust_domain=trust_domain
        )
    except (DkvError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    if written:
        typer.echo(f"wrote {len(written)} files to {out}:")
        for p in written:
            typer.echo(f"  {p}")
    else:
        typer.echo(f"certificates in {out} are up to date (use --force to replace them)")


@app.command()
def token(
    user: Annotated[str, typer.Argument(help="The user the token names (its sub): alice.")],
    directory: Annotated[
        Path,
        typer.Option("--dir", help="Where the signing key and jwks.json are (made when missing)."),
    ] = Path(".dkv/jwt"),
    ttl: Annotated[int, typer.Option(help="Seconds the token is valid.")] = 3600,
    issuer: Annotated[str, typer.Option(help="The token's issuer (iss).")] = ISSUER,
    audience: Annotated[str, typer.Option(help="The token's audience (aud).")] = AUDIENCE,
) -> None:
    """Print a bearer token naming USER, for HTTP clients without a client certificate
    (Envoy checks it against DIR/jwks.json: dkv-gateway --envoy-jwks-file). Development
    only: in production your identity provider issues tokens. See docs/security.md."""
    try:
        keys = write_token_keys(directory)
        typer.echo(issue_token(keys.load_key(), user, ttl_s=ttl, issuer=issuer, audience=audience))
    except (DkvError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1 if isinstance(exc, OSError) else 2) from exc


def _host_port(value: str, option: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> ``(host, port)``; ``BadParameter`` otherwise."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise typer.BadParameter(
            f"want HOST:PORT with a port in 1-65535, got {value!r}", param_hint=option
        )
    return host, int(port)


@app.command("envoy-bootstrap")
def envoy_bootstrap(
    xds: Annotated[
        str, typer.Option(help="The gateway's xDS (ADS) server as HOST:PORT.", show_default=False)
    ],
    admin_port: Annotated[
        int, typer.Option(min=1, max=65535, help="Envoy's admin port (bound to 127.0.0.1).")
    ] = 9901,
    node_id: Annotated[str, typer.Option(help="Envoy's node id, as the xDS server sees it.")] = (
        "dkv-envoy"
    ),
    out: Annotated[
        Path | None, typer.Option(help="Write the bootstrap here (default: stdout).")
    ] = None,
    cert_file: Annotated[
        Path | None,
        typer.Option(
            help="Envoy's certificate: the xDS connection speaks mTLS (a gateway "
            "with --cert-file serves xDS only to Envoy's identity)."
        ),
    ] = None,
    key_file: Annotated[Path | None, typer.Option(help="Envoy's key.")] = None,
    trusted_ca_file: Annotated[Path | None, typer.Option(help="The CA of the gateway.")] = None,
    sds_dir: Annotated[
        str, typer.Option(help="Read those files by SDS from this directory (rotation).")
    ] = "",
    trust_domain: Annotated[
        str, typer.Option(help="Accept only spiffe://DOMAIN/gateway as the xDS server.")
    ] = "dkv",
) -> None:
    """Write Envoy's bootstrap (JSON, also valid YAML): the admin endpoint, the ADS server
    and a limit on client connections; listeners and clusters come from the gateway over
    xDS. Start Envoy with `envoy -c FILE`."""
    # Imported here: the gateway package (and Envoy's API protos) only matters to this command.
    from dkv_gateway import envoy_config  # noqa: PLC0415

    ads_host, ads_port = _host_port(xds, "--xds")
    if not node_id:
        raise typer.BadParameter("must not be empty", param_hint="--node-id")
    files = [cert_file, key_file, trusted_ca_file]
    if any(files) and not all(files):
        raise typer.BadParameter("--cert-file, --key-file and --trusted-ca-file go together")
    ads_tls = (
        envoy_config.TlsFiles(str(cert_file), str(key_file), str(trusted_ca_file))
        if all(files)
        else None
    )
    if sds_dir and ads_tls is not None:
        envoy_config.write_ads_sds_files(sds_dir, ads_tls)
    config = envoy_config.bootstrap(
        ads_host=ads_host,
        ads_port=ads_port,
        admin_port=admin_port,
        node_id=node_id,
        ads_tls=ads_tls,
        sds_dir=sds_dir if ads_tls is not None else "",
        trust_domain=trust_domain,
    )
    if out is None:
        typer.echo(envoy_config.bootstrap_json(config), nl=False)
        return
    try:
        envoy_config.write_bootstrap(str(out), config)
    except OSError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"wrote Envoy's bootstrap to {out}", err=True)


@app.command("envoy-drain")
def envoy_drain(
    admin: Annotated[
        str, typer.Option(help="Envoy's admin interface as HOST:PORT (its loopback).")
    ] = "127.0.0.1:9901",
    wait_s: Annotated[
        float,
        typer.Option(
            "--wait-s",
            min=0,
            help="Then wait this long (Envoy's --drain-time-s) before returning, so calls on "
            "the connections told to go away can finish.",
        ),
    ] = 10.0,
) -> None:
    """Tell Envoy to drain its listeners gracefully (HTTP/2 clients get GOAWAY and move to
    another front door; calls in flight finish), then wait. A Kubernetes preStop hook: the
    pod stops only after its clients have left."""
    import time  # noqa: PLC0415
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    host, port = _host_port(admin, "--admin")
    url = f"http://{host}:{port}/drain_listeners?graceful"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=5):
            pass
    except (urllib.error.URLError, OSError) as exc:
        # Envoy already gone: nothing to drain, and the pod may stop.
        typer.echo(f"envoy-drain: {url}: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"envoy-drain: draining, waiting {wait_s:g} s", err=True)
    time.sleep(wait_s)


@app.command()
def dev(
    root: Annotated[Path, typer.Option(help="Data, certificates and logs.")] = Path(".dkv"),
    port_base: Annotated[
        int,
        typer.Option(
            min=1024, max=65000, help="Ports are this plus fixed offsets (front door: +9)."
        ),
    ] = 2370,
    shards: Annotated[
        int, typer.Option(min=1, max=1024, help="Shards of a new cluster (fixed after).")
    ] = 8,
    membership_replicas: Annotated[
        int,
        typer.Option(
            min=1, max=3, help="Membership replicas of a new cluster: 1, or 3 to try failover."
        ),
    ] = 1,
    prometheus: Annotated[
        bool,
        typer.Option(
            help="Also run Prometheus (if installed: apt-get install prometheus), scraping "
            "every process, with its data under ROOT/prometheus."
        ),
    ] = True,
    jaeger: Annotated[
        bool,
        typer.Option(
            help="Also run Jaeger (if built: make jaeger) in memory, and trace every request "
            "through Envoy, the gateway, the nodes and Raft into it."
        ),
    ] = True,
    trace_sample_ratio: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of requests traced (parentbased_traceidratio) when Jaeger runs.",
        ),
    ] = 1.0,
    bearer_tokens: Annotated[
        bool,
        typer.Option(
            help="Envoy also takes bearer tokens (`dkv token USER --dir ROOT/jwt`) from "
            "clients without a certificate."
        ),
    ] = False,
) -> None:
    """Run the whole platform locally (membership, 3 nodes, gateway, Envoy, and Prometheus
    and Jaeger when they can be had) until Ctrl-C.
    A process that dies is reported and restarted with backoff. Running it again with the
    same --root resumes the same cluster and data."""
    # Imported here: it pulls in the gateway package and Envoy's API protos.
    from dkv import devstack  # noqa: PLC0415

    if membership_replicas == 2:
        raise typer.BadParameter("1 or 3 (two replicas tolerate no failure)")
    layout = devstack.DevLayout(
        root.absolute(),
        port_base=port_base,
        shards=shards,
        membership_replicas=membership_replicas,
        prometheus=prometheus,
        jaeger=jaeger,
        trace_sample_ratio=trace_sample_ratio,
        bearer_tokens=bearer_tokens,
    )
    code = devstack.run(layout)
    raise typer.Exit(code)
