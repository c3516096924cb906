"""The consensus core stays pure: no I/O, no clock, no threads, no global randomness.

Determinism is what makes the simulator's seeds replayable; one stray ``import time`` or
``random.random()`` in the core would quietly break every replay command.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dkv.raft

RAFT_DIR = Path(dkv.raft.__file__).parent
FORBIDDEN = {
    "asyncio",
    "datetime",
    "grpc",
    "logging",
    "os",
    "random",
    "rocksdict",
    "secrets",
    "socket",
    "subprocess",
    "threading",
    "time",
    "uuid",
}


def _imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("module", sorted(p.name for p in RAFT_DIR.glob("*.py")))
def test_core_module_imports_nothing_impure(module: str) -> None:
    bad = _imported_roots(RAFT_DIR / module) & FORBIDDEN
    assert not bad, f"dkv/raft/{module} imports {sorted(bad)}; the core must stay pure"


def test_the_check_catches_a_forbidden_import(tmp_path: Path) -> None:
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("import os\nfrom time import monotonic\nfrom . import sibling\n")
    assert _imported_roots(sneaky) & FORBIDDEN == {"os", "time"}
