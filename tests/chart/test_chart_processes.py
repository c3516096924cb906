"""The chart's pods as local processes: what `helm install` would run, wired as rendered.

No cluster can be had here, so this plays kubelet, cert-manager and cluster DNS for one
render: every pod gets its own loopback address (127.1.0.x) in place of 0.0.0.0, its volumes
become directories (Secrets from certificates issued to the rendered Certificates' specs,
ConfigMaps from their data), the pod and Service DNS names resolve through an /etc/hosts that
only these processes see (a private mount namespace), and $(POD_NAME) is expanded as the
kubelet would. Then the `helm test` hook's own script must write and read a key through Envoy.

What this proves: the flags, paths, ports, certificate names and SPIFFE identities in the
chart fit together as the processes need (membership bootstraps, nodes join and get shards,
the gateway configures Envoy, the front door serves the hook's client). What it cannot: the
image, the kubelet, cert-manager itself, NetworkPolicies, probes timing.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from tests.chart.chart import NAMESPACE, RELEASE, Rendered, pod_spec, render

pytestmark = pytest.mark.slow

READY_TIMEOUT_S = 240.0  # generous: on a loaded 2-core machine the processes took 40 s to start
POD_NET = "127.1.0."


def _free(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True


def _ports() -> dict[str, int]:
    """Chart ports in a free range (every pod address and loopback)."""
    # Above the devstack tests' range (10,000-30,000 plus a stack's offsets), below the
    # kernel's ephemeral ports (32,768 on).
    rng = random.Random()
    for _ in range(50):
        base = rng.randrange(30_400, 32_700, 20)
        ports = {
            "membership.ports.client": base,
            "membership.ports.peer": base + 1,
            "membership.ports.metrics": base + 2,
            "node.ports.client": base + 3,
            "node.ports.peer": base + 4,
            "node.ports.metrics": base + 5,
            "gateway.ports.client": base + 6,
            "gateway.ports.xds": base + 7,
            "gateway.ports.metrics": base + 8,
            "gateway.envoy.adminPort": base + 9,
            "frontDoor.port": base + 10,
            "gateway.envoy.statsPort": base + 11,
        }
        ips = ["127.0.0.1", *(f"{POD_NET}{i}" for i in range(10, 40))]
        if all(_free(ip, p) for p in ports.values() for ip in ("0.0.0.0", *ips[:1])):
            return ports
    pytest.skip("no free range of ports")


def _issue(rendered: Rendered, secrets_dir: Path) -> None:
    """cert-manager's part: a CA, and each Certificate's Secret as tls.crt, tls.key, ca.crt."""
    from dkv.security.certs import issue_certificate, make_ca

    ca = make_ca()
    ca_pem = ca.cert.public_bytes(serialization.Encoding.PEM)
    for cert in rendered.of_kind("Certificate"):
        spec = cert["spec"]
        if spec.get("isCA"):
            continue
        uris = spec.get("uris", [])
        assert len(uris) == 1
        leaf = issue_certificate(
            ca,
            spec["commonName"],
            dns_names=spec.get("dnsNames", []),
            ip_addresses=spec.get("ipAddresses", []),
            uri=uris[0],
        )
        d = secrets_dir / spec["secretName"]
        d.mkdir(parents=True)
        (d / "tls.crt").write_bytes(leaf.cert.public_bytes(serialization.Encoding.PEM))
        key = leaf.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        (d / "tls.key").write_bytes(key)
        (d / "ca.crt").write_bytes(ca_pem)


class Pod:
    """One pod: its address, its root (volumes at their mount paths under it), its name."""

    def __init__(self, name: str, workload: dict[str, Any], ip: str, root: Path) -> None:
        self.name, self.workload, self.ip, self.root = name, workload, ip, root

    def path(self, text: str) -> str:
        """Absolute paths of the pod (volumes) under its root; $(POD_NAME) expanded."""
        text = text.replace("$(POD_NAME)", self.name).replace("$(POD_NAMESPACE)", NAMESPACE)
        for prefix in ("/etc/", "/var/"):
            text = text.replace(prefix, f"{self.root}{prefix}")
        return text

    def lay_out(self, rendered: Rendered, secrets: Path) -> None:
        spec = pod_spec(self.workload)
        mounts: dict[str, str] = {}
        for c in spec["containers"]:
            for m in c.get("volumeMounts", []):
                mounts.setdefault(m["name"], m["mountPath"])
        for volume in spec.get("volumes", []):
            target = Path(self.path(mounts[volume["name"]])) if volume["name"] in mounts else None
            if target is None or target == Path("/tmp"):
                continue  # the pod's /tmp (an emptyDir) is the machine's here
            target.mkdir(parents=True, exist_ok=True)
            if "secret" in volume:
                for f in (secrets / volume["secret"]["secretName"]).iterdir():
                    shutil.copy(f, target / f.name)
            for source in volume.get("projected", {}).get("sources", []):
                for item in source["secret"]["items"]:
                    dest = target / item["path"]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(secrets / source["secret"]["name"] / item["key"], dest)
            if "configMap" in volume:
                data = rendered.get("ConfigMap", volume["configMap"]["name"])["data"]
                items = volume["configMap"].get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    dest = target / item["path"]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_text(self.path(data[item["key"]]).replace("0.0.0.0", self.ip))
        for claim in self.workload["spec"].get("volumeClaimTemplates", []):
            Path(self.path(mounts[claim["metadata"]["name"]])).mkdir(parents=True, exist_ok=True)

    def argv(self, container: dict[str, Any]) -> list[str]:
        command = container["command"][0]
        if command == "envoy":
            from dkv.devstack import envoy_binary

            binary = envoy_binary()
        else:
            binary = str(Path(sys.executable).parent / command)
        args = [self.path(a).replace("0.0.0.0", self.ip) for a in container.get("args", [])]
        return [binary, *args]


def _hosts(pods: list[Pod], rendered: Rendered) -> str:
    """Cluster DNS for these pods: pod names under their headless Service, and the Services."""
    lines = ["127.0.0.1 localhost"]
    suffixes = (f".{NAMESPACE}.svc.cluster.local", f".{NAMESPACE}.svc", f".{NAMESPACE}", "")
    for pod in pods:
        service = pod.workload["spec"].get("serviceName")
        if service:
            lines.append(" ".join([pod.ip, *(f"{pod.name}.{service}{s}" for s in suffixes)]))
    by_component = {p.workload["metadata"]["name"]: p for p in pods}
    for svc in rendered.of_kind("Service"):
        if svc["spec"].get("clusterIP") == "None":
            continue
        component = svc["spec"]["selector"]["app.kubernetes.io/component"]
        target = next(
            p
            for n, p in by_component.items()
            if n == f"{RELEASE}-{component}" or n.startswith(f"{RELEASE}-{component}")
        )
        name = svc["metadata"]["name"]
        lines.append(" ".join([target.ip, *(f"{name}{s}" for s in suffixes)]))
    return "\n".join(lines) + "\n"


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    # Only what this test started, by its own handles.
    for p in reversed(started):
        if p.poll() is None:
            p.terminate()
    for p in started:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_the_rendered_pods_serve_the_helm_test(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare (a private /etc/hosts for the pods' DNS names)")
    values: dict[str, Any] = {
        "membership.replicas": 1,
        "node.replicas": 3,
        "gateway.replicas": 1,
        "logLevel": "info",
        **_ports(),
    }
    rendered = render(values)
    secrets = tmp_path / "secrets"
    _issue(rendered, secrets)
    pods: list[Pod] = []
    ip = 10
    for w in rendered.workloads():
        if w["kind"] == "Pod":
            continue
        names = (
            [f"{w['metadata']['name']}-{i}" for i in range(w["spec"]["replicas"])]
            if w["kind"] == "StatefulSet"
            else [f"{w['metadata']['name']}-x1"]
        )
        for name in names:
            pods.append(Pod(name, w, f"{POD_NET}{ip}", tmp_path / "pods" / name))
            ip += 1
    hook = rendered.get("Pod", f"{RELEASE}-test-front-door")
    hook_pod = Pod("hook", hook, f"{POD_NET}{ip}", tmp_path / "pods" / "hook")
    for pod in [*pods, hook_pod]:
        pod.lay_out(rendered, secrets)
    hosts = tmp_path / "hosts"
    hosts.write_text(_hosts(pods, rendered))
    # Each process in a mount namespace of its own whose /etc/hosts is ours.
    wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts)]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRPC_DNS_RESOLVER": "native"}
    env = {k: v for k, v in env.items() if not k.startswith("DKV_")}
    logs = tmp_path / "logs"
    logs.mkdir()
    order = {"membership": 0, "node": 1, "gateway": 2}
    for pod in sorted(pods, key=lambda p: order[p.workload["metadata"]["name"].split("-")[-1]]):
        for c in pod_spec(pod.workload)["containers"]:
            with (logs / f"{pod.name}-{c['name']}.log").open("wb") as log:
                processes.append(
                    subprocess.Popen(
                        [*wrap, *pod.argv(c)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        cwd=pod.root,
                    )
                )

    def tails() -> str:
        return "\n".join(
            f"== {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-8:])
            for f in sorted(logs.iterdir())
        )

    # The hook's own script, its env with the pod's paths.
    (c,) = pod_spec(hook)["containers"]
    hook_env = {e["name"]: hook_pod.path(e["value"]) for e in c["env"]}
    script = c["args"][0].replace("dkvctl ", f"{Path(sys.executable).parent / 'dkvctl'} ")
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        dead = [p for p in processes if p.poll() is not None]
        assert not dead, f"a process exited ({dead[0].args}):\n{tails()}"
        out = subprocess.run(
            [*wrap, "sh", "-ec", script],
            env={**env, **hook_env},
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if out.returncode == 0:
            assert "ok" in out.stdout
            break
        if time.monotonic() > deadline:
            pytest.fail(f"the helm test hook never passed: {out.stdout}{out.stderr}\n{tails()}")
        time.sleep(2)
    # Envoy's metrics, for Prometheus, and nothing else of its admin interface.
    (gateway,) = [p for p in pods if p.workload["kind"] == "Deployment"]
    stats = f"http://{gateway.ip}:{values['gateway.envoy.statsPort']}"
    with urllib.request.urlopen(f"{stats}/stats/prometheus", timeout=5) as resp:
        assert b"envoy_cluster_upstream_rq_total" in resp.read()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{stats}/quitquitquit", data=b"", timeout=5)
    refused.value.close()  # an HTTPError holds the response (and its socket) open
    assert refused.value.code == 404
    # Every pod is ready, as its readiness probe asks.
    for pod in pods:
        for c in pod_spec(pod.workload)["containers"]:
            probe = c["readinessProbe"]
            if "httpGet" not in probe:
                continue
            port = next(
                p["containerPort"] for p in c["ports"] if p["name"] == probe["httpGet"]["port"]
            )
            url = f"http://{pod.ip}:{port}{probe['httpGet']['path']}"
            for _ in range(30):
                try:
                    with urllib.request.urlopen(url, timeout=2) as resp:
                        if resp.status == 200:
                            break
                except urllib.error.HTTPError as exc:
                    exc.close()  # 503: not ready yet
                except OSError:
                    pass
                time.sleep(1)
            else:
                pytest.fail(f"{pod.name}: {url} never answered 200\n{tails()}")
