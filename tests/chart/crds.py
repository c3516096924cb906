"""Custom resources checked against their CustomResourceDefinitions' OpenAPI v3 schemas.

The CRDs are vendored in ``crds/`` from pinned releases (``crds/README.md`` says where from).
kubernetes-validate knows only built-in kinds, so this does what the API server's strict field
validation would: the object's ``spec`` against the served version's ``openAPIV3Schema``, with
unknown fields refused (every object schema gets ``additionalProperties: false`` unless it says
``x-kubernetes-preserve-unknown-fields``), and the metadata checked for the names Kubernetes
accepts.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

CRD_DIR = Path(__file__).with_name("crds")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def _strict(schema: Any) -> Any:
    """A copy of ``schema`` in which objects with ``properties`` refuse other fields, and
    Kubernetes' int-or-string is a type JSON Schema knows."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if out.get("x-kubernetes-int-or-string"):
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the strict schema of every served version of every vendored CRD."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served"):
                    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
                    out[(f"{group}/{version['name']}", kind)] = _strict(schema)
    return out


def validate_custom_resource(obj: dict[str, Any]) -> None:
    """Fail the test unless ``obj`` is valid for its vendored CRD."""
    key = (obj["apiVersion"], obj["kind"])
    what = f"{obj['kind']} {obj['metadata'].get('name')}"
    schema = schemas().get(key)
    if schema is None:
        pytest.fail(f"{what}: no CRD for {key} in {CRD_DIR} (have {sorted(schemas())})")
    name = obj["metadata"].get("name", "")
    assert _DNS_SUBDOMAIN.match(name) and len(name) <= 253, f"{what}: bad name"
    body = {k: v for k, v in obj.items() if k != "metadata"}
    # metadata is ObjectMeta (the API server's, not the CRD's): checked above.
    top = dict(schema)
    top["properties"] = {k: v for k, v in schema.get("properties", {}).items() if k != "metadata"}
    # No check of the schema against a metaschema: CRDs use Go regexes (``(?i)`` mid-pattern)
    # that JSON Schema's ECMA-262 format check refuses.
    try:
        jsonschema.Draft7Validator(top).validate(body)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        pytest.fail(f"{what} does not match its CRD at {where or '(top)'}: {exc.message}")
