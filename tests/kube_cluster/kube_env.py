"""The running local Kubernetes (`make kube-up`), as the tests drive it: kubectl and helm with
the cluster's admin kubeconfig, image imports, waits on objects, client certificates from
Secrets, and /metrics of a pod through the API server's proxy.

Nothing here starts the cluster: a test run that finds none skips (`make test`), or fails
when ``DKV_KUBE_TEST=require`` (`make test-kube`, CI).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dkv.client import ClientTls
from kube import layout
from kube.cluster import KubeError, api_ready, build, import_images, pid_of
from kube.layout import Layout

REPO = layout.REPO
NAMESPACE = "dkv"
RELEASE = "dkv"
IMAGE_REPOSITORY = "dkv.local/dkv"
FRONT_DOOR_NODE_PORT = 30379
VALUES = Path(__file__).with_name("values.yaml")


def _tool(script: str) -> Path:
    """A cached build's path (kube.cluster.build: the script's stdout)."""
    try:
        return Path(build(script))
    except KubeError as exc:
        pytest.fail(str(exc))


@dataclass
class Kube:
    lay: Layout
    kubectl_bin: Path
    helm_bin: Path

    @classmethod
    def find(cls) -> Kube:
        """The running cluster, or skip (fail under DKV_KUBE_TEST=require)."""
        lay = Layout.from_env()
        required = os.environ.get("DKV_KUBE_TEST") == "require"
        reason = None
        if os.geteuid() != 0:
            reason = "needs root (the cluster's state dir and containerd socket)"
        elif pid_of(lay, "kubelet") is None or not lay.kubeconfig.exists():
            reason = f"no cluster from make kube-up at {lay.state}"
        elif not api_ready(lay):
            reason = f"the API server of {lay.state} does not answer"
        if reason:
            if required:
                pytest.fail(f"DKV_KUBE_TEST=require: {reason}")
            pytest.skip(reason)
        bin_dir = _tool("kube/build.sh")
        return cls(lay, bin_dir / "kubectl", _tool("tools/helm/build.sh"))

    # -- commands --------------------------------------------------------------------------

    def _run(self, argv: list[str], stdin: str | None, check: bool) -> str:
        env = dict(os.environ, KUBECONFIG=str(self.lay.kubeconfig))
        done = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, env=env, check=False
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv[:6])} exited {done.returncode}: {done.stderr.strip()}"
            )
        return done.stdout

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        return self._run([str(self.kubectl_bin), *args], stdin, check)

    def helm(self, *args: str, check: bool = True) -> str:
        return self._run([str(self.helm_bin), *args], None, check)

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", "-n", NAMESPACE, "-o", "json", *args))

    def import_image(self, archive: Path) -> None:
        import_images(self.lay, [str(archive)])

    def reset(self) -> None:
        """No release, no namespace, no claims: a first install. The volumes the last run's
        claims held are emptied and offered again."""
        self.helm("uninstall", RELEASE, "-n", NAMESPACE, "--wait", check=False)
        self.kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found", "--timeout=300s")
        self.recycle_volumes()

    def recycle_volumes(self) -> None:
        """Released volumes (their claims deleted) emptied and made Available: kube-up's
        hostPath volumes have no provisioner to do it (reclaim policy Retain)."""
        for pv in json.loads(self.kubectl("get", "pv", "-o", "json"))["items"]:
            if pv.get("status", {}).get("phase") != "Released":
                continue
            path = Path(pv["spec"]["hostPath"]["path"])
            assert path.is_relative_to(self.lay.volumes), f"not kube-up's volume: {path}"
            for child in path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            self.kubectl(
                "patch",
                "pv",
                pv["metadata"]["name"],
                "--type=json",
                "-p",
                '[{"op": "remove", "path": "/spec/claimRef"}]',
            )

    def renew_certificate(self, name: str) -> None:
        """What `cmctl renew` does: an Issuing condition on the Certificate's status, which
        cert-manager answers with a new certificate (and, with rotationPolicy Always, key)."""
        cert = self.get("certificate.cert-manager.io", name)
        conditions = [
            c for c in cert.get("status", {}).get("conditions", []) if c["type"] != "Issuing"
        ]
        conditions.append(
            {
                "type": "Issuing",
                "status": "True",
                "reason": "ManuallyTriggered",
                "message": "renewal asked for by tests/kube_cluster",
                "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
        self.kubectl(
            "patch",
            "certificate.cert-manager.io",
            name,
            "-n",
            NAMESPACE,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": {"conditions": conditions}}),
        )

    # -- waiting ----------------------------------------------------------------------------

    @staticmethod
    def wait(pred: Callable[[], bool], what: str, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
            time.sleep(1.0)  # the API server's state, polled as kubectl wait does

    def pods(self, component: str | None = None) -> list[dict[str, Any]]:
        selector = f"app.kubernetes.io/instance={RELEASE}"
        if component:
            selector += f",app.kubernetes.io/component={component}"
        items: list[dict[str, Any]] = self.get("pods", "-l", selector)["items"]
        return [p for p in items if not p["metadata"].get("annotations", {}).get("helm.sh/hook")]

    @staticmethod
    def ready(pod: dict[str, Any]) -> bool:
        if pod["metadata"].get("deletionTimestamp"):
            return False
        conditions = pod.get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def all_ready(self, expected: dict[str, int]) -> bool:
        for component, count in expected.items():
            pods = self.pods(component)
            if len(pods) != count or not all(self.ready(p) for p in pods):
                return False
        return True

    # -- what the tests read ------------------------------------------------------------------

    def client_tls(self, secret: str, into: Path) -> ClientTls:
        """A kubernetes.io/tls Secret (cert-manager's) as files, for dkv's clients."""
        data = self.get("secret", secret)["data"]
        into.mkdir(parents=True, exist_ok=True)
        for name in ("tls.crt", "tls.key", "ca.crt"):
            path = into / name
            path.write_bytes(base64.b64decode(data[name]))
            path.chmod(0o600)
        return ClientTls(str(into / "tls.crt"), str(into / "tls.key"), str(into / "ca.crt"))

    def metrics(self, pod: str, port: int) -> str:
        """A pod's /metrics through the API server's pod proxy (pod addresses exist only in
        the cluster's network namespace)."""
        return self.kubectl(
            "get", "--raw", f"/api/v1/namespaces/{NAMESPACE}/pods/{pod}:{port}/proxy/metrics"
        )

    @property
    def front_door(self) -> str:
        return f"{layout.NODE_IP}:{FRONT_DOOR_NODE_PORT}"


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of the first sample NAME with LABELS in the Prometheus text format (None:
    no such sample), parsed by prometheus-client."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None
