"""The committed generated code matches protos/, and the schema's enums match dkv.raft.types.

The generated modules under src/dkv/v1/ are committed so that dkv imports without protoc;
this test regenerates them exactly as ``make proto`` does and fails when they are stale.
"""

from __future__ import annotations

import enum
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from dkv.raft import types
from dkv.v1 import raft_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
GENERATED = ROOT / "src" / "dkv" / "v1"
STALE = "generated protobuf code is stale: run `make proto` and commit the result"


def _generated_files(directory: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.is_file() and "_pb2" in p.name and p.suffix in {".py", ".pyi"}
    }


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    protos = sorted(p.relative_to(ROOT).as_posix() for p in PROTO_ROOT.glob("dkv/v1/*.proto"))
    assert protos, "no .proto files found under protos/dkv/v1"
    # Same invocation as the Makefile's proto target, run from the repository root so the
    # paths recorded in the generated code are identical.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iprotos",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *protos,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"protoc failed:\n{result.stderr}"

    fresh = _generated_files(tmp_path / "dkv" / "v1")
    committed = _generated_files(GENERATED)
    assert fresh, "protoc produced no files"
    assert sorted(committed) == sorted(fresh), (
        f"{STALE} (committed {sorted(committed)}, expected {sorted(fresh)})"
    )
    stale = [name for name in fresh if committed[name] != fresh[name]]
    assert not stale, f"{STALE}: {stale} differ"


@pytest.mark.parametrize(
    ("py_enum", "pb_enum", "prefix"),
    [
        (types.MessageType, raft_pb2.MessageType, "MESSAGE_TYPE_"),
        (types.EntryType, raft_pb2.EntryType, "ENTRY_TYPE_"),
        (types.ConfChangeType, raft_pb2.ConfChangeType, "CONF_CHANGE_TYPE_"),
    ],
    ids=["MessageType", "EntryType", "ConfChangeType"],
)
def test_enums_match_types(
    py_enum: type[enum.IntEnum], pb_enum: EnumTypeWrapper, prefix: str
) -> None:
    # The schema prefixes each value with its enum's name (proto3 enum values share the
    # package namespace); beyond that, names and numbers must agree in both directions.
    expected = {prefix + member.name: member.value for member in py_enum}
    assert dict(pb_enum.items()) == expected
