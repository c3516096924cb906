"""Our cert-manager binaries against a real API server, with the RBAC of the manifests.

kube-apiserver (kube/build.sh) and etcd 3.6 (tools/etcd/build.sh) run in a network namespace
of the test's own, with nothing else: no kubelet, no pods. ``cert-manager.yaml`` is applied
(its webhook configurations pointed at a URL in that namespace instead of the Service), and
the three binaries, taken from their images' layers, run there with their ServiceAccounts'
tokens. Then: the controller issues cert-manager/dkv-certificates.yaml (the chain the dkv
chart makes) and renews a short-lived Certificate; the cainjector fills the webhook
configurations' caBundle; the webhook refuses a malformed Certificate.

Needs root (network namespaces), Go (the builds, cached), umoci's archives (build.sh); skipped
with the reason otherwise, or failed under ``DKV_KUBE_IMAGES_TEST=require``.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "kube" / "images"
APISERVER_PORT = 26443
WEBHOOK_PORT = 26444

pytestmark = [pytest.mark.kube_images, pytest.mark.slow]


def _skip_or_fail(message: str) -> None:
    if os.environ.get("DKV_KUBE_IMAGES_TEST") == "require":
        pytest.fail(message)
    pytest.skip(message)


def _tool(*command: str) -> str:
    """The path a build script prints; skip when it says a prerequisite is missing (exit 3)."""
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode == 3:
        _skip_or_fail(out.stderr.strip().splitlines()[-1])
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()[-1]


def _binary_from_archive(archive: Path, path: str, out: Path) -> Path:
    """The file PATH of the (one-layer) image in the OCI archive, written to OUT."""
    with tarfile.open(archive) as tar:

        def blob(digest: str) -> bytes:
            f = tar.extractfile("blobs/sha256/" + digest.removeprefix("sha256:"))
            assert f
            return f.read()

        f = tar.extractfile("index.json")
        assert f
        index = json.load(f)
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        (layer,) = manifest["layers"]
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob(layer["digest"])))) as fs:
            f = fs.extractfile(path) or fs.extractfile("./" + path)
            assert f
            out.write_bytes(f.read())
    out.chmod(0o755)
    return out


class Netns:
    """A network namespace with only loopback, removed at the end; every process started in
    it is stopped by its PID."""

    def __init__(self, stack: ExitStack, work: Path) -> None:
        self.name = f"kimg-{os.getpid()}"
        self.work = work
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        stack.callback(subprocess.run, ["ip", "netns", "delete", self.name], check=False)
        subprocess.run(self.wrap("ip", "link", "set", "lo", "up"), check=True)
        self.stack = stack

    def wrap(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *command]

    def start(self, name: str, *command: str) -> Path:
        log = self.work / f"{name}.log"
        with log.open("wb") as f:
            proc = subprocess.Popen(self.wrap(*command), stdout=f, stderr=subprocess.STDOUT)

        def stop() -> None:
            proc.terminate()
            proc.wait()

        self.stack.callback(stop)
        return log


@contextmanager
def _control_plane(work: Path) -> Iterator[tuple[Netns, list[str]]]:
    """etcd and kube-apiserver in a network namespace; yields it and the admin's kubectl."""
    etcd = _tool(str(REPO / "tools/etcd/build.sh"))
    k8s = Path(_tool(str(REPO / "kube/build.sh")))
    openssl = shutil.which("openssl")
    if not openssl:
        _skip_or_fail("openssl not installed")
    assert openssl
    subprocess.run([openssl, "genrsa", "-out", str(work / "sa.key"), "2048"], check=True,
                   capture_output=True)  # fmt: skip
    subprocess.run([openssl, "rsa", "-in", str(work / "sa.key"), "-pubout", "-out",
                    str(work / "sa.pub")], check=True, capture_output=True)  # fmt: skip
    (work / "tokens.csv").write_text("admin-token,admin,admin,system:masters\n")
    with ExitStack() as stack:
        ns = Netns(stack, work)
        ns.start(
            "etcd", etcd, "--data-dir", str(work / "etcd"),
            "--listen-client-urls", "http://127.0.0.1:23791",
            "--advertise-client-urls", "http://127.0.0.1:23791",
            "--listen-peer-urls", "http://127.0.0.1:23801",
            "--initial-advertise-peer-urls", "http://127.0.0.1:23801",
            "--initial-cluster", "default=http://127.0.0.1:23801",
        )  # fmt: skip
        ns.start(
            "kube-apiserver", str(k8s / "kube-apiserver"),
            "--etcd-servers=http://127.0.0.1:23791",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={APISERVER_PORT}", f"--cert-dir={work / 'apiserver'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={work / 'sa.pub'}",
            f"--service-account-signing-key-file={work / 'sa.key'}",
            "--authorization-mode=RBAC", f"--token-auth-file={work / 'tokens.csv'}",
            "--service-cluster-ip-range=10.96.0.0/16",
        )  # fmt: skip
        _kubeconfig(work / "admin.kubeconfig", "admin-token")
        kubectl = ns.wrap(str(k8s / "kubectl"), "--kubeconfig", str(work / "admin.kubeconfig"))
        # The API server offers no event for "ready": ask until it says so.
        while subprocess.run([*kubectl, "get", "--raw", "/readyz"], capture_output=True,
                             check=False).returncode:  # fmt: skip
            time.sleep(0.5)
        yield ns, kubectl


def _kubeconfig(path: Path, token: str) -> None:
    cluster = {"server": f"https://127.0.0.1:{APISERVER_PORT}", "insecure-skip-tls-verify": True}
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": cluster}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "u"}}],
    }))  # fmt: skip


def _run(kubectl: list[str], *args: str, stdin: str | None = None) -> str:
    out = subprocess.run([*kubectl, *args], input=stdin, capture_output=True, text=True,
                         check=False)  # fmt: skip
    assert out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}"
    return out.stdout


def _chart_args(objects: list[dict[str, Any]], deployment: str) -> list[str]:
    (d,) = (o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == deployment)
    args = d["spec"]["template"]["spec"]["containers"][0]["args"]
    return [a.replace("$(POD_NAMESPACE)", "cert-manager") for a in args]


def test_cert_manager_issues_the_dkv_chain_on_an_api_server(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("curl"):
        _skip_or_fail("needs root, ip (network namespaces) and curl")
    archives = _tool(str(IMAGES / "build.sh"), "cert-manager")  # the last: cainjector
    archive_dir = Path(archives).parent
    version = next(n.split(":")[1] for n in subprocess.run(
        [str(IMAGES / "build.sh"), "names", "cert-manager"], capture_output=True, text=True,
        check=True).stdout.split())  # fmt: skip
    binaries = {
        c: _binary_from_archive(
            archive_dir / f"cert-manager-{c}-{version}.oci.tar", f"app/cmd/{c}/{c}", tmp_path / c
        )
        for c in ("controller", "webhook", "cainjector")
    }
    manifest = (IMAGES / "manifests" / "cert-manager.yaml").read_text()
    objects = [d for d in yaml.safe_load_all(manifest) if d]

    with _control_plane(tmp_path) as (ns, kubectl):
        _run(kubectl, "apply", "--server-side", "-f", "-", stdin=manifest)
        # The API server cannot reach a Service here (no node, no proxy): the webhooks are
        # called at a URL in the namespace instead, with the Service's path.
        for kind, path in (("validatingwebhookconfiguration", "validate"),
                           ("mutatingwebhookconfiguration", "mutate")):  # fmt: skip
            patch = [
                {"op": "remove", "path": "/webhooks/0/clientConfig/service"},
                {"op": "add", "path": "/webhooks/0/clientConfig/url",
                 "value": f"https://localhost:{WEBHOOK_PORT}/{path}"},
            ]  # fmt: skip
            _run(kubectl, "patch", kind, "cert-manager-webhook", "--type=json",
                 "-p", json.dumps(patch))  # fmt: skip
        for sa in ("cert-manager", "cert-manager-webhook", "cert-manager-cainjector"):
            token = _run(kubectl, "-n", "cert-manager", "create", "token", sa).strip()
            _kubeconfig(tmp_path / f"{sa}.kubeconfig", token)

        def kc(sa: str) -> str:
            return f"--kubeconfig={tmp_path / f'{sa}.kubeconfig'}"

        # Each with the arguments its Deployment gives it, and addresses of this namespace.
        ns.start("controller", str(binaries["controller"]), kc("cert-manager"),
                 *_chart_args(objects, "cert-manager"),
                 "--metrics-listen-address=127.0.0.1:29402",
                 "--internal-healthz-listen-address=127.0.0.1:29403")  # fmt: skip
        webhook_args = [
            a for a in _chart_args(objects, "cert-manager-webhook")
            if not a.startswith(("--secure-port", "--dynamic-serving-dns-names"))
        ]  # fmt: skip
        ns.start("webhook", str(binaries["webhook"]), kc("cert-manager-webhook"), *webhook_args,
                 f"--secure-port={WEBHOOK_PORT}", "--healthz-port=26445",
                 "--dynamic-serving-dns-names=localhost",
                 "--metrics-listen-address=127.0.0.1:29412")  # fmt: skip
        ns.start("cainjector", str(binaries["cainjector"]), kc("cert-manager-cainjector"),
                 *_chart_args(objects, "cert-manager-cainjector"),
                 "--metrics-listen-address=127.0.0.1:29422")  # fmt: skip

        # The cainjector gives both webhook configurations the webhook's CA.
        for kind in ("validatingwebhookconfiguration", "mutatingwebhookconfiguration"):
            _run(kubectl, "wait", kind, "cert-manager-webhook", "--timeout=-1s",
                 "--for=jsonpath={.webhooks[0].clientConfig.caBundle}")  # fmt: skip
        # The webhook serves once it has a certificate from its CA: no event says so, ask.
        while subprocess.run(ns.wrap("curl", "-sf", "http://127.0.0.1:26445/healthz"),
                             capture_output=True, check=False).returncode:  # fmt: skip
            time.sleep(0.5)
        # The dkv chain (cert-manager/, the chart's certificates for the release dkv).
        _run(kubectl, "create", "namespace", "dkv")
        _run(kubectl, "apply", "-n", "dkv", "-f", str(REPO / "cert-manager/dkv-certificates.yaml"))
        _run(kubectl, "-n", "dkv", "wait", "certificate", "--all", "--for=condition=Ready",
             "--timeout=-1s")  # fmt: skip
        secret = json.loads(_run(kubectl, "-n", "dkv", "get", "secret", "dkv-node-0-tls",
                                 "-o", "json"))  # fmt: skip
        pem = base64.b64decode(secret["data"]["tls.crt"])
        text = subprocess.run(["openssl", "x509", "-noout", "-text"], input=pem,
                              capture_output=True, check=True).stdout.decode()  # fmt: skip
        assert "URI:spiffe://dkv/node/dkv-node-0" in text
        assert "DNS:*.dkv-node-headless.dkv.svc.cluster.local" in text
        assert "Issuer: CN = dkv CA" in text
        # A Certificate due for renewal 15 s after issue is renewed.
        short = {
            "apiVersion": "cert-manager.io/v1", "kind": "Certificate",
            "metadata": {"name": "short", "namespace": "dkv"},
            "spec": {"secretName": "short-tls", "commonName": "short", "duration": "1h",
                     "renewBefore": "59m45s",
                     "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
                     "issuerRef": {"name": "dkv-ca", "kind": "Issuer"}},
        }  # fmt: skip
        _run(kubectl, "apply", "-f", "-", stdin=json.dumps(short))
        _run(kubectl, "-n", "dkv", "wait", "certificate/short", "--timeout=-1s",
             "--for=jsonpath={.status.revision}=2")  # fmt: skip
        # Every CertificateRequest carries its creator (the webhook's mutation).
        requests = json.loads(_run(kubectl, "-n", "dkv", "get", "certificaterequests",
                                   "-o", "json"))["items"]  # fmt: skip
        assert {r["spec"]["username"] for r in requests} == {
            "system:serviceaccount:cert-manager:cert-manager"
        }
        # The webhook refuses a malformed Certificate.
        bad = {
            "apiVersion": "cert-manager.io/v1", "kind": "Certificate",
            "metadata": {"name": "bad", "namespace": "dkv"},
            "spec": {"secretName": "bad-tls", "issuerRef": {"name": "dkv-ca"},
                     "privateKey": {"algorithm": "ECDSA", "size": 999}},
        }  # fmt: skip
        refused = subprocess.run([*kubectl, "apply", "-f", "-"], input=json.dumps(bad),
                                 capture_output=True, text=True, check=False)  # fmt: skip
        assert refused.returncode != 0
        assert 'admission webhook "webhook.cert-manager.io" denied the request' in refused.stderr
        assert "spec.privateKey.size: Unsupported value: 999" in refused.stderr
