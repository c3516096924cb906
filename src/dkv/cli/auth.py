"""``dkvctl auth``: the access policy, read where the processes read it (offline).

``dkvctl auth check SUBJECT ACTION KEY`` answers as the servers would and names the rule
(Casbin's own ``enforce_ex``): exit 0 allowed, 1 denied, 2 a bad policy or argument.
``dkvctl auth roles SUBJECT`` lists the roles a subject holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dkv.errors import InvalidArgument
from dkv.security.authz import Action, Authorizer, KeyRange, PolicyFiles
from dkv.security.identity import Identity

__all__ = ["auth_app"]

auth_app = typer.Typer(
    help="The access policy (model.conf, policy.csv): explain decisions.", no_args_is_help=True
)

PolicyDir = Annotated[
    Path,
    typer.Option(
        "--policy-dir",
        envvar="DKVCTL_POLICY_DIR",
        help="Directory with model.conf and policy.csv (make run's: .dkv/auth).",
    ),
]


def _load(policy_dir: Path) -> Authorizer:
    try:
        return Authorizer.from_files(PolicyFiles.in_directory(policy_dir))
    except InvalidArgument as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from exc


@auth_app.command("check")
def check(
    subject: Annotated[str, typer.Argument(help="user:NAME, node:NAME, gateway, ...")],
    action: Annotated[str, typer.Argument(help="read, write or admin")],
    key: Annotated[str, typer.Argument(help="A key, or the start of --end/--prefix.")] = "",
    end: Annotated[str | None, typer.Option(help="The range [KEY, END).")] = None,
    prefix: Annotated[bool, typer.Option(help="Every key starting with KEY.")] = False,
    policy_dir: PolicyDir = Path(".dkv/auth"),
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable answer.")] = False,
) -> None:
    """Would SUBJECT be allowed ACTION on KEY? Names the rule that allows it."""
    if not subject.startswith("role:"):
        try:
            Identity.parse_subject(subject)
        except InvalidArgument as exc:
            typer.echo(f"Error: {exc}", err=True)
            raise typer.Exit(2) from exc
    if action not in Action.__members__.values():
        typer.echo("Error: ACTION must be read, write or admin", err=True)
        raise typer.Exit(2)
    act = Action(action)
    if end is not None and prefix:
        typer.echo("Error: give --end or --prefix, not both", err=True)
        raise typer.Exit(2)
    raw = key.encode()
    if act is Action.ADMIN:
        keys = KeyRange.everything()  # admin is checked on every key
    elif prefix:
        keys = KeyRange.prefix(raw)
    elif end is not None:
        keys = KeyRange.of_request(raw, end.encode() or b"\0")
    else:
        keys = KeyRange.key(raw)
    decision = _load(policy_dir).explain(subject, act, keys)
    if as_json:
        typer.echo(
            json.dumps(
                {"allowed": decision.allowed, "rule": decision.rule, "reason": decision.reason}
            )
        )
    else:
        typer.echo(decision.reason if decision.allowed else f"denied: {decision.reason}")
    raise typer.Exit(0 if decision.allowed else 1)


@auth_app.command("roles")
def roles(
    subject: Annotated[str, typer.Argument(help="user:NAME, node:NAME, gateway, ...")],
    policy_dir: PolicyDir = Path(".dkv/auth"),
) -> None:
    """The roles SUBJECT holds (directly or through other roles)."""
    for role in _load(policy_dir).roles(subject):
        typer.echo(role)
