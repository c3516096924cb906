"""The committed generated code matches protos/, and the schema's enums match dkv.raft.types.

The generated modules under src/dkv/v1/ are committed so that dkv imports without protoc;
this test regenerates them exactly as ``make proto`` does and fails when they are stale. The
same holds for the gateway's descriptor set of kv.proto (the gRPC-JSON transcoder's input).
"""

from __future__ import annotations

import enum
import subprocess
import sys
from pathlib import Path

import google.api.annotations_pb2
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from dkv.raft import types
from dkv.v1 import raft_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
GENERATED = ROOT / "src" / "dkv" / "v1"
DESCRIPTOR_SET = ROOT / "services" / "gateway" / "dkv_gateway" / "dkv_descriptor.pb"
STALE = "generated protobuf code is stale: run `make proto` and commit the result"


def _googleapis_include() -> str:
    """Where google/api/annotations.proto lives: as the Makefile's GOOGLEAPIS_PROTOS finds it."""
    return str(Path(google.api.annotations_pb2.__file__).parents[2])


def _protoc(*args: str) -> None:
    """Run protoc from the repository root (as ``make proto`` does: same recorded paths)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iprotos",
            f"-I{_googleapis_include()}",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"protoc failed:\n{result.stderr}"


def _generated_files(directory: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.is_file() and "_pb2" in p.name and p.suffix in {".py", ".pyi"}
    }


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    protos = sorted(p.relative_to(ROOT).as_posix() for p in PROTO_ROOT.glob("dkv/v1/*.proto"))
    assert protos, "no .proto files found under protos/dkv/v1"
    _protoc(
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        *protos,
    )
    fresh = _generated_files(tmp_path / "dkv" / "v1")
    committed = _generated_files(GENERATED)
    assert fresh, "protoc produced no files"
    assert sorted(committed) == sorted(fresh), (
        f"{STALE} (committed {sorted(committed)}, expected {sorted(fresh)})"
    )
    stale = [name for name in fresh if committed[name] != fresh[name]]
    assert not stale, f"{STALE}: {stale} differ"


def _descriptor_set(path: Path) -> descriptor_pb2.FileDescriptorSet:
    return descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())


def test_descriptor_set_is_up_to_date(tmp_path: Path) -> None:
    """Compared as messages, not bytes: only what the descriptors say matters to Envoy."""
    out = tmp_path / "dkv_descriptor.pb"
    _protoc("--include_imports", f"--descriptor_set_out={out}", "protos/dkv/v1/kv.proto")
    fresh, committed = _descriptor_set(out), _descriptor_set(DESCRIPTOR_SET)
    names = [f.name for f in fresh.file]
    assert [f.name for f in committed.file] == names, f"{STALE} (descriptor set files differ)"
    stale = [a.name for a, b in zip(fresh.file, committed.file, strict=True) if a != b]
    assert not stale, f"{STALE}: {stale} differ in {DESCRIPTOR_SET.name}"
    # The transcoder needs the service with its HTTP bindings and every import.
    assert {"dkv/v1/kv.proto", "google/api/annotations.proto", "google/api/http.proto"} <= set(
        names
    )


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
