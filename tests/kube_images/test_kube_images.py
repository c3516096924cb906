"""The cluster's own images (kube/images/build.sh) and their manifests (kube/images/manifests).

The manifests are checked against Kubernetes' schemas (kubernetes-validate, strict) and, for
cert-manager's, against a fresh render of its chart. The build test builds every image (or
takes them from the cache: ``${DKV_CACHE_DIR:-~/.cache/dkv}/kube/images``; several minutes
cold), imports every archive into a containerd of its own (root, state and socket in a
temporary directory; never the machine's), checks the names they get with no flag, and runs
each binary in a container of its image with ``ctr run`` (runc): ``pause`` runs as 65535 and
exits 0 on SIGTERM, CoreDNS prints its version and, as user 65532, serves on port 53 by its
file capability, the cert-manager binaries print their version and help.

The build test needs root, Go, umoci, gcc, containerd, ctr and runc; without them it is
skipped with the reason, unless ``DKV_KUBE_IMAGES_TEST=require`` (CI): then it fails.
``pytest -m kube_images`` selects these tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "kube" / "images"
BUILD = IMAGES / "build.sh"
MANIFESTS = IMAGES / "manifests"
# The schema of the cluster's minor release (k8s.io/kubernetes v1.34.4).
KUBERNETES_VERSION = "1.34.0"
PREFIX = "dkv.local/"
TOOLS = ("umoci", "gcc", "containerd", "ctr", "runc", "jq")

pytestmark = pytest.mark.kube_images


def _build_sh_var(name: str) -> str:
    m = re.search(rf"^{name}=(\S+)", BUILD.read_text(), re.M)
    assert m, name
    return m[1]


def _image_names() -> list[str]:
    out = subprocess.run([str(BUILD), "names"], capture_output=True, text=True, check=True)
    return out.stdout.split()


def _objects(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def _coredns(*args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [str(MANIFESTS / "render-coredns.sh"), *args], capture_output=True, text=True, check=True
    )
    return _objects(out.stdout)


def _validate(objects: list[dict[str, Any]]) -> None:
    """Every object of a built-in kind, strictly against the schema of KUBERNETES_VERSION;
    custom resources (none here) have no schema there and are left out."""
    import kubernetes_validate

    for obj in objects:
        what = f"{obj['kind']} {obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            continue
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{what} is invalid for Kubernetes {KUBERNETES_VERSION}: {exc}")


def _images_of(objects: list[dict[str, Any]]) -> set[str]:
    images = set()
    for obj in objects:
        if obj["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
            spec = obj["spec"]["template"]["spec"]
            for c in spec.get("initContainers", []) + spec["containers"]:
                images.add(c["image"])
                assert c.get("imagePullPolicy") == "Never", f"{obj['metadata']['name']} pulls"
    return images


# -- manifests ----------------------------------------------------------------------------------


def test_build_sh_names_every_image_under_the_local_prefix() -> None:
    names = _image_names()
    assert names == [
        f"dkv.local/pause:{_build_sh_var('PAUSE_VERSION')}",
        f"dkv.local/coredns:{_build_sh_var('COREDNS_VERSION')}",
        f"dkv.local/cert-manager-controller:{_build_sh_var('CERT_MANAGER_VERSION')}",
        f"dkv.local/cert-manager-webhook:{_build_sh_var('CERT_MANAGER_VERSION')}",
        f"dkv.local/cert-manager-cainjector:{_build_sh_var('CERT_MANAGER_VERSION')}",
    ]
    one = subprocess.run(
        [str(BUILD), "names", "coredns"], capture_output=True, text=True, check=False
    )
    assert one.stdout.split() == [names[1]]
    bad = subprocess.run([str(BUILD), "nonsense"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "usage" in bad.stderr


@pytest.mark.parametrize("forward", [[], ["--forward", "192.0.2.53"]], ids=["alone", "forward"])
def test_coredns_manifests(forward: list[str]) -> None:
    objects = _coredns("--dns-ip", "10.96.0.10", *forward)
    _validate(objects)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert kinds == {
        ("ServiceAccount", "coredns"),
        ("ClusterRole", "system:coredns"),
        ("ClusterRoleBinding", "system:coredns"),
        ("ConfigMap", "coredns"),
        ("Deployment", "coredns"),
        ("Service", "kube-dns"),
    }
    assert all(o["metadata"].get("namespace", "kube-system") == "kube-system" for o in objects)
    (service,) = (o for o in objects if o["kind"] == "Service")
    assert service["spec"]["clusterIP"] == "10.96.0.10"
    assert {(p["port"], p["protocol"]) for p in service["spec"]["ports"]} >= {
        (53, "UDP"),
        (53, "TCP"),
    }
    (deployment,) = (o for o in objects if o["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert _images_of(objects) == {f"dkv.local/coredns:{_build_sh_var('COREDNS_VERSION')}"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 65532
    (corefile,) = (o["data"]["Corefile"] for o in objects if o["kind"] == "ConfigMap")
    assert "kubernetes cluster.local in-addr.arpa ip6.arpa {" in corefile
    assert "${" not in json.dumps(objects)
    forwards = re.findall(r"^\s*forward .*$", corefile, re.M)
    assert [f.strip() for f in forwards] == (["forward . 192.0.2.53"] if forward else [])


def test_coredns_render_refuses_bad_arguments() -> None:
    script = str(MANIFESTS / "render-coredns.sh")
    for args in ([], ["--dns-ip"], ["--dns-ip", "10.0.0.1; rm"], ["--dns-ip", "1.2.3.4", "-x"]):
        r = subprocess.run([script, *args], capture_output=True, text=True, check=False)
        assert r.returncode == 2 and "usage" in r.stderr, args


@pytest.mark.parametrize("webhook", [True, False], ids=["webhook", "without-webhook"])
def test_cert_manager_manifests(webhook: bool) -> None:
    path = MANIFESTS / ("cert-manager.yaml" if webhook else "cert-manager-without-webhook.yaml")
    objects = _objects(path.read_text())
    _validate(objects)
    version = _build_sh_var("CERT_MANAGER_VERSION")
    commands = ["controller", "cainjector"] + (["webhook"] if webhook else [])
    assert _images_of(objects) == {f"dkv.local/cert-manager-{c}:{version}" for c in commands}
    assert _images_of(objects) <= set(_image_names())
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("Namespace", "cert-manager") in kinds
    crds = {name for kind, name in kinds if kind == "CustomResourceDefinition"}
    assert crds == {
        f"{r}.cert-manager.io"
        for r in ("certificates", "certificaterequests", "issuers", "clusterissuers")
    } | {f"{r}.acme.cert-manager.io" for r in ("orders", "challenges")}
    # The webhook configurations name the webhook's Service; without it, nothing may call one
    # (an unreachable webhook would refuse every write of cert-manager's resources).
    configs = {k for k in kinds if k[0].endswith("WebhookConfiguration")}
    if webhook:
        assert configs == {
            ("ValidatingWebhookConfiguration", "cert-manager-webhook"),
            ("MutatingWebhookConfiguration", "cert-manager-webhook"),
        }
        assert ("Service", "cert-manager-webhook") in kinds
    else:
        assert not [k for k in kinds if "webhook" in k[1]]
    (controller,) = (
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "cert-manager"
    )
    args = controller["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--cluster-resource-namespace=$(POD_NAMESPACE)" in args


@pytest.mark.parametrize("webhook", [True, False], ids=["webhook", "without-webhook"])
def test_cert_manager_manifests_are_the_charts(webhook: bool) -> None:
    name = "cert-manager.yaml" if webhook else "cert-manager-without-webhook.yaml"
    flags = [] if webhook else ["--without-webhook"]
    out = subprocess.run(
        [str(MANIFESTS / "render-cert-manager.sh"), *flags],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode == 3:
        pytest.skip(out.stderr.strip().splitlines()[-1])
    assert out.returncode == 0, out.stderr
    regenerate = f"kube/images/manifests/render-cert-manager.sh {' '.join(flags)} > {name}"
    assert out.stdout == (MANIFESTS / name).read_text(), regenerate


# -- the images ---------------------------------------------------------------------------------


def _prerequisites() -> None:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/local/go/bin"
    why = [f"{t} not installed" for t in TOOLS if shutil.which(t, path=path) is None]
    if shutil.which("go", path=path) is None and not os.environ.get("GO"):
        why.append("no Go toolchain")
    if os.geteuid() != 0:
        why.append("not root")
    if why:
        message = "cannot build or run the cluster's images: " + "; ".join(why)
        if os.environ.get("DKV_KUBE_IMAGES_TEST") == "require":
            pytest.fail(message)
        pytest.skip(message)


class Containerd:
    """A containerd of our own: root, state, socket and FIFOs under one temporary directory,
    the CRI plugin off (nothing but ctr talks to it), stopped by its PID."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.socket = base / "containerd.sock"
        config = base / "config.toml"
        config.write_text(
            f'version = 2\nroot = "{base}/root"\nstate = "{base}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.socket}"\n'
            f'[ttrpc]\n  address = "{self.socket}.ttrpc"\n'
            '[debug]\n  address = ""\n[metrics]\n  address = ""\n'
            f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{base}/opt"\n'
        )
        self.log: list[str] = []
        self.process = subprocess.Popen(
            ["containerd", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stderr
        for line in self.process.stderr:
            self.log.append(line)
            if "containerd successfully booted" in line:
                break
        else:
            pytest.fail("containerd did not start:\n" + "".join(self.log[-20:]))
        # Keep reading its log, or it blocks on a full pipe.
        self.drain = threading.Thread(target=self._drain, daemon=True)
        self.drain.start()

    def _drain(self) -> None:
        assert self.process.stderr
        for line in self.process.stderr:
            self.log.append(line)

    def ctr(self, *args: str) -> list[str]:
        return ["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.ctr(*args), capture_output=True, text=True, check=False)

    def container(
        self, image: str, cid: str, *args: str, mounts: tuple[str, ...] = ()
    ) -> list[str]:
        """The command line of `ctr run --rm` of IMAGE (ARGS replace its entrypoint)."""
        extra = [a for m in mounts for a in ("--mount", m)]
        fifo = self.base / "fifo"
        return self.ctr("run", "--rm", "--fifo-dir", str(fifo), *extra, image, cid, *args)

    @contextmanager
    def events(self) -> Iterator[Iterator[tuple[str, dict[str, Any]]]]:
        """containerd's events as (topic, payload), from now on."""
        proc = subprocess.Popen(self.ctr("events"), stdout=subprocess.PIPE, text=True)

        def stream() -> Iterator[tuple[str, dict[str, Any]]]:
            assert proc.stdout
            for line in proc.stdout:
                m = re.search(r" (/\S+) (\{.*\})$", line)
                if m:
                    yield m[1], json.loads(m[2])

        try:
            yield stream()
        finally:
            proc.kill()
            proc.wait()
            assert proc.stdout
            proc.stdout.close()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()
        self.drain.join()
        assert self.process.stderr
        self.process.stderr.close()


def _started(events: Iterator[tuple[str, dict[str, Any]]], cid: str) -> int | None:
    """The PID of container CID's task once started; None if it exited first."""
    for topic, payload in events:
        if payload.get("container_id") != cid:
            continue
        if topic == "/tasks/start":
            return int(payload["pid"])
        if topic == "/tasks/exit":
            return None
    return None


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _archive_index(tar: tarfile.TarFile) -> tuple[dict[str, Any], dict[str, Any]]:
    """(index.json, the image config) of an OCI archive."""

    def blob(digest: str) -> dict[str, Any]:
        f = tar.extractfile("blobs/sha256/" + digest.removeprefix("sha256:"))
        assert f
        return json.load(f)  # type: ignore[no-any-return]

    f = tar.extractfile("index.json")
    assert f
    index = json.load(f)
    (manifest,) = index["manifests"]
    config = blob(blob(manifest["digest"])["config"]["digest"])
    return index, config


@pytest.mark.slow
def test_images_build_import_and_run(tmp_path: Path) -> None:
    _prerequisites()
    built = subprocess.run([str(BUILD), "all"], capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr[-4000:]
    archives = [Path(p) for p in built.stdout.split()]
    names = _image_names()
    assert [a.name for a in archives] == [
        n.removeprefix(PREFIX).replace(":", "-") + ".oci.tar" for n in names
    ]
    # Built once: a second run takes every archive from the cache.
    again = subprocess.run([str(BUILD)], capture_output=True, text=True, check=True)
    assert again.stdout.split() == built.stdout.split()
    assert "built in" not in again.stderr

    configs = {}
    for archive, name in zip(archives, names, strict=True):
        with tarfile.open(archive) as tar:
            index, config = _archive_index(tar)
        (manifest,) = index["manifests"]
        assert manifest["annotations"]["io.containerd.image.name"] == name
        assert manifest["annotations"]["org.opencontainers.image.ref.name"] == name.split(":")[1]
        assert config["os"] == "linux" and config["architecture"] == "amd64"
        configs[name] = config["config"]
    pause, coredns, controller, webhook, cainjector = names
    assert configs[pause]["User"] == "65535:65535" and configs[pause]["Entrypoint"] == ["/pause"]
    assert configs[coredns]["User"] == "65532:65532"
    assert configs[coredns]["Entrypoint"] == ["/coredns"]
    for name, binary in (
        (controller, "controller"),
        (webhook, "webhook"),
        (cainjector, "cainjector"),
    ):
        assert configs[name]["User"] == "1000:1000"
        assert configs[name]["Entrypoint"] == [f"/app/cmd/{binary}/{binary}"]

    # A short path: unix sockets are limited to 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="kimg-", dir="/tmp"))
    containerd = Containerd(base)
    try:
        for archive in archives:
            imported = containerd.run("images", "import", str(archive))
            assert imported.returncode == 0, imported.stderr
        listed = containerd.run("images", "list", "--quiet")
        assert sorted(listed.stdout.split()) == sorted(names)
        _run_each(containerd, names, tmp_path)
    finally:
        containerd.stop()
        shutil.rmtree(base, ignore_errors=True)


def _run_each(containerd: Containerd, names: list[str], tmp_path: Path) -> None:
    pause, coredns, controller, webhook, cainjector = names
    version = _build_sh_var("CERT_MANAGER_VERSION")

    # pause: its image's user, waits, exits 0 on SIGTERM.
    with containerd.events() as events:
        proc = subprocess.Popen(
            containerd.container(pause, "pause"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        pid = _started(events, "pause")
        assert pid, proc.communicate()
        assert _status(pid)["Uid"].split()[0] == "65535"
        assert containerd.run("task", "kill", "--signal", "SIGTERM", "pause").returncode == 0
        out, err = proc.communicate()
        assert proc.returncode == 0, out + err
        assert "Shutting down, got signal" in err
    v = containerd.run("run", "--rm", pause, "pause-v", "/pause", "-v")
    assert v.stdout.startswith(f"pause.c v{pause.split(':')[1]}"), v.stdout + v.stderr

    # CoreDNS: its version; then, as its image's user, it serves on port 53.
    v = containerd.run("run", "--rm", coredns, "coredns-v", "/coredns", "-version")
    assert v.returncode == 0 and f"CoreDNS-{coredns.split(':v')[1]}" in v.stdout, v
    conf = tmp_path / "coredns"
    conf.mkdir()
    (conf / "Corefile").write_text(".:53 {\n    whoami\n}\n")
    conf.chmod(0o755)
    with containerd.events() as events:
        proc = subprocess.Popen(
            containerd.container(
                coredns, "coredns", "/coredns", "-conf", "/etc/coredns/Corefile",
                mounts=(f"type=bind,src={conf},dst=/etc/coredns,options=rbind:ro",),
            ),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        pid = _started(events, "coredns")
        assert pid, proc.communicate()
        assert proc.stdout
        lines = []
        for line in proc.stdout:  # CoreDNS prints its servers once they listen
            lines.append(line)
            if line.startswith("CoreDNS-"):
                break
        assert ".:53\n" in lines, "".join(lines)
        status = _status(pid)
        assert status["Uid"].split()[0] == "65532"
        assert containerd.run("task", "kill", "--signal", "SIGTERM", "coredns").returncode == 0
        proc.communicate()

    # cert-manager: version and help, and every flag its chart passes is accepted (--help
    # after them: parsed, then nothing run).
    for name, binary in (
        (controller, "controller"),
        (webhook, "webhook"),
        (cainjector, "cainjector"),
    ):
        path = f"/app/cmd/{binary}/{binary}"
        v = containerd.run("run", "--rm", name, f"{binary}-v", path, "--version")
        assert v.returncode == 0 and f"cert-manager {binary} {version}" in v.stdout, v
        chart_args = _chart_args(binary)
        h = containerd.run("run", "--rm", name, f"{binary}-h", path, *chart_args, "--help")
        assert h.returncode == 0, h
        assert "--kubeconfig" in h.stdout + h.stderr
    h = containerd.run("run", "--rm", controller, "controller-h2", "/app/cmd/controller/controller",
                       "--help")  # fmt: skip
    help_text = h.stdout + h.stderr
    for flag in ("--kubeconfig", "--cluster-resource-namespace", "--leader-elect",
                 "--metrics-listen-address", "--controllers"):  # fmt: skip
        assert flag in help_text
    for controller_name in ("issuers", "clusterissuers", "certificates-issuing",
                            "certificaterequests-issuer-ca",
                            "certificaterequests-issuer-selfsigned",
                            "certificaterequests-approver"):  # fmt: skip
        assert controller_name in help_text
    # Without a cluster it says so and fails, rather than running on nothing.
    no = containerd.run("run", "--rm", controller, "controller-x", "/app/cmd/controller/controller",
                        "--leader-elect=false", "--metrics-listen-address=127.0.0.1:0",
                        "--internal-healthz-listen-address=127.0.0.1:0")  # fmt: skip
    assert no.returncode != 0


def _chart_args(binary: str) -> list[str]:
    """The arguments cert-manager.yaml gives BINARY's container, $(POD_NAMESPACE) filled in."""
    objects = _objects((MANIFESTS / "cert-manager.yaml").read_text())
    name = {"controller": "cert-manager"}.get(binary, f"cert-manager-{binary}")
    (deployment,) = (
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == name
    )
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return [a.replace("$(POD_NAMESPACE)", "cert-manager") for a in args]
