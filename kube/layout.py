"""Where everything of the local cluster lives, and its addresses.

Every file is under one state directory (``DKV_KUBE_DIR``, default ``build/kube`` in the
repository); every process runs in one network namespace the scripts create
(``DKV_KUBE_NETNS``, default ``dkv-kube``), joined to the machine by one veth pair: the machine
side is ``HOST_IP``, the namespace side ``NODE_IP`` -- the node's address, where the API server,
the kubelet and NodePort Services listen. Pods and Services get addresses that exist only
inside the namespace. Nothing binds on the machine's own interfaces.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

NODE_NAME = "dkv-kube"
HOST_IP = "10.213.0.1"
NODE_IP = "10.213.0.2"
LINK_PREFIX = 30
POD_CIDR = "10.214.0.0/16"
POD_SUBNET = "10.214.0.0/24"  # the one node's share of POD_CIDR (host-local IPAM)
SERVICE_CIDR = "10.215.0.0/16"
API_SERVICE_IP = "10.215.0.1"  # the first address of SERVICE_CIDR: Service "kubernetes"
DNS_SERVICE_IP = "10.215.0.10"
CLUSTER_DOMAIN = "cluster.local"
API_PORT = 6443
HOST_VETH = "dkvk0"
NS_VETH = "eth0"
BRIDGE = "cni0"
# Persistent volumes made at start (hostPath, StorageClass "local"): enough for 5 nodes,
# 3 membership replicas and a reinstall beside kept claims.
PV_COUNT = 16
PV_CAPACITY = "20Gi"


@dataclass(frozen=True)
class Layout:
    state: Path
    netns: str

    @classmethod
    def from_env(cls) -> Layout:
        state = Path(os.environ.get("DKV_KUBE_DIR") or REPO / "build" / "kube").resolve()
        return cls(state=state, netns=os.environ.get("DKV_KUBE_NETNS") or "dkv-kube")

    @property
    def netns_path(self) -> Path:
        return Path("/run/netns") / self.netns

    @property
    def pki(self) -> Path:
        return self.state / "pki"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def pids(self) -> Path:
        return self.state / "pids"

    @property
    def config(self) -> Path:
        return self.state / "config"

    @property
    def etcd_data(self) -> Path:
        return self.state / "etcd"

    @property
    def containerd(self) -> Path:
        return self.state / "containerd"

    @property
    def containerd_socket(self) -> Path:
        return self.containerd / "containerd.sock"

    @property
    def cni_conf(self) -> Path:
        return self.state / "cni" / "net.d"

    @property
    def cni_ipam(self) -> Path:
        return self.state / "cni" / "ipam"

    @property
    def kubelet_root(self) -> Path:
        return self.state / "kubelet"

    @property
    def pod_logs(self) -> Path:
        return self.state / "pod-logs"

    @property
    def volumes(self) -> Path:
        return self.state / "volumes"

    @property
    def kubeconfig(self) -> Path:
        """The admin's kubeconfig: what `make kube-up` prints and the tests use."""
        return self.state / "kubeconfig"

    @property
    def sysctl_saved(self) -> Path:
        return self.state / "sysctl-before.json"

    @property
    def cgroup_root_file(self) -> Path:
        return self.state / "cgroup-root"

    @property
    def server(self) -> str:
        return f"https://{NODE_IP}:{API_PORT}"
