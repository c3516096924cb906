"""`make kube-up` / `make kube-down`: a real single-node Kubernetes on this machine.

    python -m kube.cluster up       # build (cached), start, wait until the node is Ready
    python -m kube.cluster down     # stop what `up` started (by PID), remove the state dir
    python -m kube.cluster status   # what runs, one line per component

`up` is idempotent: a component whose PID file names a live process is left alone, the rest
are started, the waits run again. Every process is started in the network namespace
(layout.py), logs to <state>/logs/<component>.log and has <state>/pids/<component>.pid.
A missing prerequisite is one line on stderr and exit 3; a component that does not come up
is one line naming its log, and exit 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from kube import configs, layout
from kube.layout import Layout
from kube.pki import Pki, ensure, kubeconfig

# Started in this order, stopped in the reverse one.
ORDER = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "containerd",
    "kubelet",
    "kube-proxy",
]
# What the kubelet changes on the whole machine when protectKernelDefaults is off; put back
# by `down`.
KUBELET_SYSCTLS = [
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
]
HOST_TOOLS = ["containerd", "containerd-shim-runc-v2", "runc", "ctr", "ip", "nsenter", "iptables"]
CNI_PLUGINS = ["bridge", "host-local", "portmap", "loopback"]


class KubeError(Exception):
    """A one-line reason `up` or `down` cannot go on; exit_code 3 for a missing
    prerequisite."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def log(msg: str) -> None:
    print(f"kube: {msg}", file=sys.stderr, flush=True)


def run(argv: Sequence[str], *, check: bool = True, capture: bool = True) -> str:
    done = subprocess.run(list(argv), capture_output=capture, text=True, check=False)
    if check and done.returncode != 0:
        err = (done.stderr or done.stdout or "").strip().splitlines()
        raise KubeError(f"{' '.join(argv[:4])} failed: {err[-1] if err else done.returncode}")
    return done.stdout if capture else ""


def in_ns(lay: Layout, argv: Sequence[str]) -> list[str]:
    # Only the network namespace: the mounts the kubelet and containerd make must be seen by
    # both, and /sys/fs/cgroup must stay what it is (`ip netns exec` remounts /sys).
    return ["nsenter", f"--net={lay.netns_path}", "--", *argv]


# -- prerequisites and builds ------------------------------------------------------------------


def preflight() -> None:
    if os.geteuid() != 0:
        raise KubeError("needs root (network namespace, containerd, kubelet)", 3)
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [t for t in HOST_TOOLS if shutil.which(t, path=path) is None]
    missing += [f"/usr/lib/cni/{p}" for p in CNI_PLUGINS if not Path("/usr/lib/cni", p).exists()]
    if missing:
        raise KubeError(
            f"missing {' '.join(missing)}: apt-get install containerd runc "
            "containernetworking-plugins iptables iproute2 util-linux",
            3,
        )


def build(script: str, *args: str) -> str:
    """Run a cached build script; its stdout is the path it made."""
    done = subprocess.run(
        [str(layout.REPO / script), *args], stdout=subprocess.PIPE, text=True, check=False
    )
    if done.returncode == 3:
        raise KubeError(f"{script} cannot build here (see above)", 3)
    if done.returncode != 0:
        raise KubeError(f"{script} {' '.join(args)} failed (exit {done.returncode})")
    return done.stdout.strip()


# -- processes ------------------------------------------------------------------------------


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat, field 22): with the
    PID it names one process, across exec and PID reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    return stat.rsplit(")", 1)[1].split()[19]


def pid_of(lay: Layout, name: str) -> int | None:
    """The PID of component NAME if the process `start` recorded still runs."""
    try:
        pid_text, started = (lay.pids / f"{name}.pid").read_text().split()
        pid = int(pid_text)
    except (FileNotFoundError, ValueError):
        return None
    return pid if start_time(pid) == started else None


def start(lay: Layout, name: str, argv: Sequence[str]) -> None:
    if pid_of(lay, name) is not None:
        log(f"{name} already running")
        return
    lay.logs.mkdir(parents=True, exist_ok=True)
    lay.pids.mkdir(parents=True, exist_ok=True)
    with open(lay.logs / f"{name}.log", "ab") as out:
        proc = subprocess.Popen(
            in_ns(lay, argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this script; no signal of its terminal
        )
    (lay.pids / f"{name}.pid").write_text(f"{proc.pid} {start_time(proc.pid)}\n")
    log(f"{name} started (pid {proc.pid}, log {lay.logs / f'{name}.log'})")


def wait_for(
    what: str, ready: Callable[[], bool], timeout_s: float, lay: Layout, name: str | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        if name is not None and pid_of(lay, name) is None:
            raise KubeError(f"{name} exited before {what}: see {lay.logs / f'{name}.log'}")
        time.sleep(0.5)  # polling a process we do not control: no event to wait on
    where = f": see {lay.logs / f'{name}.log'}" if name else ""
    raise KubeError(f"{what} not after {timeout_s:.0f} s{where}")


def stop_pid(pid: int, name: str, timeout_s: float = 20.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    log(f"{name} (pid {pid}) ignored SIGTERM for {timeout_s:.0f} s: SIGKILL")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# -- the namespace, host settings ------------------------------------------------------------


def ensure_netns(lay: Layout) -> None:
    if not lay.netns_path.exists():
        run(["ip", "netns", "add", lay.netns])
    links = run(["ip", "-o", "link", "show"])
    if f" {layout.HOST_VETH}@" not in links and f" {layout.HOST_VETH}:" not in links:
        run(["ip", "link", "add", layout.HOST_VETH, "type", "veth", "peer", "name", "dkvk0ns"])
        run(["ip", "link", "set", "dkvk0ns", "netns", lay.netns])
        run(in_ns(lay, ["ip", "link", "set", "dkvk0ns", "name", layout.NS_VETH]))
        run(
            ["ip", "addr", "add", f"{layout.HOST_IP}/{layout.LINK_PREFIX}", "dev", layout.HOST_VETH]
        )
        run(["ip", "link", "set", layout.HOST_VETH, "up"])
        run(
            in_ns(
                lay,
                [
                    "ip",
                    "addr",
                    "add",
                    f"{layout.NODE_IP}/{layout.LINK_PREFIX}",
                    "dev",
                    layout.NS_VETH,
                ],
            )
        )
    run(in_ns(lay, ["ip", "link", "set", "lo", "up"]))
    run(in_ns(lay, ["ip", "link", "set", layout.NS_VETH, "up"]))
    # Local processes dialling a Service address need a route before kube-proxy's DNAT.
    run(in_ns(lay, ["ip", "route", "replace", "default", "via", layout.HOST_IP]))
    # Per-namespace settings: forwarding between the bridge and eth0, bridged pod traffic
    # through iptables (Service DNAT between two pods on the same bridge).
    for key in ("net.ipv4.ip_forward=1", "net.bridge.bridge-nf-call-iptables=1"):
        run(in_ns(lay, ["sysctl", "-qw", key]))


def save_sysctls(lay: Layout) -> None:
    if lay.sysctl_saved.exists():
        return
    before = {k: Path("/proc/sys", k).read_text().strip() for k in KUBELET_SYSCTLS}
    lay.sysctl_saved.write_text(json.dumps(before))


def restore_sysctls(lay: Layout) -> None:
    try:
        before = json.loads(lay.sysctl_saved.read_text())
    except FileNotFoundError:
        return
    for key, value in before.items():
        try:
            Path("/proc/sys", key).write_text(value)
        except OSError as e:
            log(f"could not restore {key}={value}: {e}")


def cgroup_root(lay: Layout) -> str:
    """Pods' cgroups go under ours (the memory hierarchy's path of this process), so they count
    against whoever started the cluster; kept in a file so `down` removes the same tree."""
    if lay.cgroup_root_file.exists():
        return lay.cgroup_root_file.read_text().strip()
    base = "/"
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = path
    root = (base.rstrip("/") + "/dkv-kube") if base != "/" else "/dkv-kube"
    lay.cgroup_root_file.write_text(root + "\n")
    return root


def cgroup_hierarchies(with_unified: bool = False) -> list[Path]:
    """The cgroup v1 hierarchies the kubelet uses; WITH_UNIFIED adds the v2 `unified` mount
    beside them, where runc makes a cgroup for each container too (to clean up, not to
    prepare)."""
    return [
        p
        for p in sorted(Path("/sys/fs/cgroup").iterdir())
        if p.is_dir()
        and (
            (p.name != "unified" and (p / "tasks").exists())
            or (with_unified and p.name == "unified")
        )
    ]


def make_cgroup_root(root: str) -> None:
    """The kubelet wants its cgroup root to exist in every hierarchy. A new cpuset cgroup
    starts with no CPUs and no memory nodes: each level copies its parent's."""
    for hierarchy in cgroup_hierarchies():
        parent = hierarchy
        for part in root.strip("/").split("/"):
            child = parent / part
            if not child.is_dir():
                child.mkdir()
                if hierarchy.name == "cpuset":
                    for f in ("cpuset.cpus", "cpuset.mems"):
                        (child / f).write_text((parent / f).read_text())
            parent = child


# -- up --------------------------------------------------------------------------------------


def api_ready(lay: Layout) -> bool:
    pki = Pki(lay.pki)
    ctx = ssl.create_default_context(cafile=str(pki.ca_crt))
    ctx.load_cert_chain(str(pki.crt("admin")), str(pki.key("admin")))
    try:
        with urllib.request.urlopen(f"{lay.server}/readyz", context=ctx, timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def kubectl(lay: Layout, bin_dir: Path, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [str(bin_dir / "kubectl"), f"--kubeconfig={lay.kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise KubeError(f"kubectl {' '.join(args[:3])}: {done.stderr.strip()}")
    return done.stdout


def node_ready(lay: Layout, bin_dir: Path) -> bool:
    try:
        out = kubectl(lay, bin_dir, "get", "node", layout.NODE_NAME, "-o", "json")
    except KubeError:
        return False
    conditions = json.loads(out).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def write_configs(lay: Layout) -> None:
    for d in (lay.config, lay.cni_conf, lay.cni_ipam, lay.containerd, lay.pod_logs, lay.volumes):
        d.mkdir(parents=True, exist_ok=True)
    pki = Pki(lay.pki)
    ensure(pki, configs.leaves())
    lay.kubeconfig.write_text(kubeconfig(pki, "admin", lay.server))
    lay.kubeconfig.chmod(0o600)
    for name in ("controller-manager", "scheduler", "kube-proxy", "kubelet"):
        path = lay.config / f"{name}.kubeconfig"
        path.write_text(kubeconfig(pki, name, lay.server))
        path.chmod(0o600)
    (lay.config / "containerd.toml").write_text(configs.containerd_config(lay))
    (lay.cni_conf / "10-dkv-kube.conflist").write_text(configs.cni_conflist(lay))
    root = cgroup_root(lay)
    make_cgroup_root(root)
    (lay.config / "kubelet.json").write_text(
        json.dumps(configs.kubelet_config(lay, root), indent=2)
    )
    (lay.config / "kube-proxy.json").write_text(
        json.dumps(configs.kube_proxy_config(lay), indent=2)
    )
    # Pods resolve through CoreDNS only (the kubelet adds it and the search path).
    (lay.config / "resolv.conf").write_text("options ndots:5\n")
    for i in range(layout.PV_COUNT):
        d = lay.volumes / f"{i:02d}"
        d.mkdir(exist_ok=True)
        d.chmod(0o777)  # hostPath ignores fsGroup: the pods' non-root users must write


def import_images(lay: Layout, archives: Sequence[str]) -> None:
    for archive in archives:
        run(
            [
                "ctr",
                f"--address={lay.containerd_socket}",
                "--namespace=k8s.io",
                "images",
                "import",
                "--no-unpack=false",
                archive,
            ]
        )
        log(f"imported {Path(archive).name}")


def install_addons(lay: Layout, bin_dir: Path) -> None:
    """CoreDNS and cert-manager (kube/images: built here, imported, applied), then wait until
    both serve: the chart's certificates need cert-manager's controller (and its webhook,
    which the API server calls for every cert-manager object)."""
    import_images(lay, build("kube/images/build.sh", "all").split())
    coredns = run(
        [
            str(layout.REPO / "kube/images/manifests/render-coredns.sh"),
            "--dns-ip",
            layout.DNS_SERVICE_IP,
            "--cluster-domain",
            layout.CLUSTER_DOMAIN,
        ]
    )
    kubectl(lay, bin_dir, "apply", "-f", "-", stdin=coredns)
    # Server-side: the CRDs are larger than client-side apply's last-applied annotation allows.
    manifests = layout.REPO / "kube/images/manifests/cert-manager.yaml"
    kubectl(lay, bin_dir, "apply", "--server-side", "--force-conflicts", "-f", str(manifests))
    for namespace, kind in (("kube-system", "deployment"), ("cert-manager", "deployment")):
        kubectl(
            lay,
            bin_dir,
            "wait",
            "--for=condition=Available",
            f"--namespace={namespace}",
            kind,
            "--all",
            "--timeout=300s",
        )
    log("CoreDNS and cert-manager available")


def up(lay: Layout) -> None:
    preflight()
    bin_dir = Path(build("kube/build.sh"))
    etcd = Path(build("tools/etcd/build.sh"))
    lay.state.mkdir(parents=True, exist_ok=True)
    ensure_netns(lay)
    save_sysctls(lay)
    write_configs(lay)

    start(lay, "etcd", configs.etcd_args(lay, etcd))
    start(lay, "kube-apiserver", configs.apiserver_args(lay, bin_dir))
    wait_for("the API server ready", lambda: api_ready(lay), 120, lay, "kube-apiserver")
    start(lay, "kube-controller-manager", configs.controller_manager_args(lay, bin_dir))
    start(lay, "kube-scheduler", configs.scheduler_args(lay, bin_dir))
    start(lay, "containerd", ["containerd", f"--config={lay.config / 'containerd.toml'}"])
    wait_for("containerd's socket", lay.containerd_socket.exists, 60, lay, "containerd")
    import_images(lay, build("kube/images/build.sh", "pause").split())
    start(
        lay,
        "kubelet",
        [
            str(bin_dir / "kubelet"),
            f"--config={lay.config / 'kubelet.json'}",
            f"--kubeconfig={lay.config / 'kubelet.kubeconfig'}",
            f"--root-dir={lay.kubelet_root}",
            f"--hostname-override={layout.NODE_NAME}",
            f"--node-ip={layout.NODE_IP}",
            "--v=1",
        ],
    )
    start(
        lay,
        "kube-proxy",
        [str(bin_dir / "kube-proxy"), f"--config={lay.config / 'kube-proxy.json'}"],
    )
    wait_for("node Ready", lambda: node_ready(lay, bin_dir), 180, lay, "kubelet")
    storage = {"apiVersion": "v1", "kind": "List", "items": configs.storage_manifests(lay)}
    kubectl(lay, bin_dir, "apply", "-f", "-", stdin=json.dumps(storage))
    install_addons(lay, bin_dir)
    log(f"node {layout.NODE_NAME} Ready; export KUBECONFIG={lay.kubeconfig}")
    print(lay.kubeconfig)


# -- down ------------------------------------------------------------------------------------


def our_shims(lay: Layout) -> list[int]:
    """containerd-shim processes of our containerd (they outlive it by design)."""
    pids = []
    sock = str(lay.containerd_socket)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"containerd-shim-runc-v2") and sock.encode() in cmd:
            pids.append(int(proc.name))
    return pids


def unmount_under(root: Path) -> None:
    """Everything mounted under the state dir (container rootfs, pod volumes, netns handles),
    deepest first."""
    prefix = str(root) + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefix):
            points.append(point)
    for point in sorted(set(points), key=lambda p: p.count("/"), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def cgroup_processes(lay: Layout) -> set[int]:
    """Every process in the cgroup tree of the pods, in any hierarchy."""
    try:
        root = lay.cgroup_root_file.read_text().strip()
    except FileNotFoundError:
        return set()
    pids: set[int] = set()
    for hierarchy in cgroup_hierarchies(with_unified=True):
        top = hierarchy / root.lstrip("/")
        if not top.is_dir():
            continue
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in procs.read_text().split())
    return pids


def kill_containers(lay: Layout, timeout_s: float = 20.0) -> None:
    """What is left of the pods once the kubelet, containerd and the shims are gone: a shim's
    containers outlive it (pause among them). They are ours, in our cgroup tree: SIGKILL, and
    wait until the tree is empty."""
    deadline = time.monotonic() + timeout_s
    while pids := cgroup_processes(lay):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            log(f"processes still in the pods' cgroups: {sorted(pids)}")
            return
        time.sleep(0.2)


def remove_cgroups(lay: Layout) -> None:
    """The cgroup root's tree in every hierarchy. Its parents (ours, in the memory hierarchy;
    made by make_cgroup_root in the others) stay: one may hold this very process."""
    try:
        root = lay.cgroup_root_file.read_text().strip()
    except FileNotFoundError:
        return
    for hierarchy in cgroup_hierarchies(with_unified=True):
        top = hierarchy / root.lstrip("/")
        if not top.is_dir():
            continue
        # Children before parents; a cgroup dir is removed with rmdir (its files are virtual).
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                d.rmdir()
        try:
            top.rmdir()
        except OSError as e:
            log(f"cgroup {top} left behind: {e}")


def down(lay: Layout) -> None:
    for name in reversed(ORDER):
        pid = pid_of(lay, name)
        if pid is not None:
            stop_pid(pid, name)
            log(f"{name} stopped")
    for pid in our_shims(lay):
        # A shim's containers die with it (it is their subreaper and holds their cgroup).
        stop_pid(pid, "containerd-shim", timeout_s=5)
    kill_containers(lay)
    if lay.state.exists():
        unmount_under(lay.state)
    remove_cgroups(lay)
    restore_sysctls(lay)
    if lay.netns_path.exists():
        run(["ip", "netns", "delete", lay.netns], check=False)
    run(["ip", "link", "delete", layout.HOST_VETH], check=False)
    if lay.state.exists():
        shutil.rmtree(lay.state, ignore_errors=True)
        if lay.state.exists():
            raise KubeError(f"could not remove {lay.state} (something still mounted?)")
    log("down")


def status(lay: Layout) -> int:
    bad = 0
    for name in ORDER:
        pid = pid_of(lay, name)
        print(f"{name:24} {'pid ' + str(pid) if pid else 'not running'}")
        bad += pid is None
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0] not in ("up", "down", "status"):
        print("usage: python -m kube.cluster up|down|status", file=sys.stderr)
        return 2
    lay = Layout.from_env()
    try:
        if args[0] == "up":
            up(lay)
        elif args[0] == "down":
            down(lay)
        else:
            return status(lay)
    except KubeError as e:
        log(str(e))
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
