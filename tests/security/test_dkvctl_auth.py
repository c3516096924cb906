"""``dkvctl auth check`` explains decisions from the policy files, as the servers decide."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dkv.security.authz import write_default_policy


def dkvctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dkv.cli.dkvctl", "auth", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    files = write_default_policy(tmp_path)
    files.policy.write_text(files.policy.read_text() + "p, user:alice, app/*, write\n")
    return tmp_path


def test_check_names_the_rule_or_says_why_not(policy_dir: Path) -> None:
    d = ("--policy-dir", str(policy_dir))
    ok = dkvctl("check", "user:alice", "write", "app/x/y", *d)
    assert ok.returncode == 0 and ok.stdout.strip() == "allowed by 'p, user:alice, app/*, write'"
    no = dkvctl("check", "user:alice", "write", "apple", *d)
    assert no.returncode == 1
    assert no.stdout.strip() == "denied: no rule lets user:alice (no roles) write b'apple'"
    # A range or prefix must lie inside a grant.
    assert dkvctl("check", "user:alice", "write", "app/", "--prefix", *d).returncode == 0
    assert dkvctl("check", "user:alice", "write", "app/", "--end", "b", *d).returncode == 1
    admin = dkvctl("check", "user:admin", "admin", *d, "--json")
    assert json.loads(admin.stdout) == {
        "allowed": True,
        "rule": ["role:admin", "*", "admin"],
        "reason": "allowed by 'p, role:admin, *, admin'",
    }
    assert dkvctl("roles", "user:reader", *d).stdout.split() == ["role:reader"]


def test_bad_arguments_and_policies_exit_2(policy_dir: Path, tmp_path: Path) -> None:
    d = ("--policy-dir", str(policy_dir))
    bad = dkvctl("check", "alice", "read", "k", *d)
    assert bad.returncode == 2 and "is not a subject" in bad.stderr
    assert dkvctl("check", "user:a", "fly", "k", *d).returncode == 2
    missing = dkvctl("check", "user:a", "read", "k", "--policy-dir", str(tmp_path / "none"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
