"""What the chart tests share: the Helm CLI (built from its Go module by tools/helm/build.sh),
rendering charts/dkv with a set of values, and reading the rendered objects.

Without a Helm binary the tests skip locally (no Go toolchain: `make test` says so in one line),
but fail under CI (``CI`` set), which has Go: the chart must never go unchecked there.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "dkv"
BUILD_SH = ROOT / "tools" / "helm" / "build.sh"
RELEASE = "dkv"
NAMESPACE = "dkv-test"


def helm_version() -> str:
    """The pinned version, read from tools/helm/build.sh (one place to bump it)."""
    match = re.search(r"^HELM_VERSION=(\S+)$", BUILD_SH.read_text(), re.M)
    assert match, "tools/helm/build.sh names no HELM_VERSION"
    return match.group(1)


def cached_helm() -> Path:
    cache = Path(os.environ.get("DKV_CACHE_DIR") or Path.home() / ".cache" / "dkv")
    return cache / "helm" / helm_version() / "helm"


@functools.cache
def _helm_or_reason() -> tuple[str | None, str]:
    path = cached_helm()
    if path.is_file():
        return str(path), ""
    # Not built yet (`make test` builds it first; a bare pytest may not have): build it now.
    # build.sh holds a lock, so parallel workers wait for one build.
    out = subprocess.run(["bash", str(BUILD_SH)], capture_output=True, text=True, check=False)
    if out.returncode == 0:
        return out.stdout.strip(), ""
    tail = "\n".join(out.stderr.strip().splitlines()[-5:])
    if out.returncode == 3:
        return None, f"no Go toolchain to build Helm {helm_version()}: {tail}"
    return None, f"building Helm {helm_version()} failed (exit {out.returncode}):\n{tail}"


def helm() -> str:
    """The helm binary; skips the test without one, fails it under CI."""
    path, reason = _helm_or_reason()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} -- CI has Go, so the chart tests must run there")
        pytest.skip(reason)
    return path


def set_args(values: Mapping[str, Any]) -> list[str]:
    """``--set-json key=<json>`` for each value (types kept exactly as given)."""
    import json

    out: list[str] = []
    for key, value in values.items():
        out += ["--set-json", f"{key}={json.dumps(value)}"]
    return out


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm(), *args], capture_output=True, text=True, check=False)


@dataclass(frozen=True)
class Rendered:
    """One `helm template` of the chart: every object, by kind and name."""

    values: Mapping[str, Any]
    objects: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for o in self.of_kind(kind):
            if o["metadata"]["name"] == name:
                return o
        raise KeyError(
            f"no {kind} {name}; have {[o['metadata']['name'] for o in self.of_kind(kind)]}"
        )

    def workloads(self) -> Iterator[dict[str, Any]]:
        """StatefulSets, Deployments and Pods (the test hook)."""
        for o in self.objects:
            if o["kind"] in ("StatefulSet", "Deployment", "Pod"):
                yield o


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    if workload["kind"] == "Pod":
        return dict(workload["spec"])
    return dict(workload["spec"]["template"]["spec"])


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    if workload["kind"] == "Pod":
        return dict(workload["metadata"].get("labels", {}))
    return dict(workload["spec"]["template"]["metadata"].get("labels", {}))


def render(
    values: Mapping[str, Any] | None = None,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    show_only: str | None = None,
) -> Rendered:
    """``helm template`` (tests included) with ``values``; fails the test if Helm refuses."""
    values = dict(values or {})
    args = ["template", release, str(CHART), "--namespace", namespace, *set_args(values)]
    if show_only:
        args += ["--show-only", show_only]
    out = run_helm(*args)
    assert out.returncode == 0, f"helm template {values} failed:\n{out.stderr}"
    objects = [d for d in yaml.safe_load_all(out.stdout) if d]
    return Rendered(values, objects)


def render_error(values: Mapping[str, Any]) -> str:
    """Helm's error for ``values`` (fails the test if it renders)."""
    out = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *set_args(values))
    assert out.returncode != 0, f"helm template accepted {values}"
    return out.stderr
