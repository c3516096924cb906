"""The command lines and configuration files of every component of the local cluster.

Pure functions of the layout: `kube/cluster.py` writes and starts them. Flags are the ones a
kubeadm control plane passes, minus what a single throwaway node does not need (leader
election, aggregation, cloud providers). JSON is written where the component reads YAML.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kube import layout
from kube.layout import Layout
from kube.pki import Leaf, Pki

PAUSE_IMAGE = "dkv.local/pause:3.10.1"


def leaves() -> list[Leaf]:
    """Every certificate of the cluster. The subjects are what Kubernetes' bootstrap RBAC
    policy binds (pki.py)."""
    node = layout.NODE_NAME
    return [
        Leaf(
            "apiserver",
            "kube-apiserver",
            dns=(
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                f"kubernetes.default.svc.{layout.CLUSTER_DOMAIN}",
                "localhost",
            ),
            ips=(layout.NODE_IP, layout.API_SERVICE_IP, "127.0.0.1"),
            server=True,
            client=False,
        ),
        Leaf("apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",)),
        Leaf("admin", "dkv-kube-admin", ("system:masters",)),
        Leaf("controller-manager", "system:kube-controller-manager"),
        Leaf("scheduler", "system:kube-scheduler"),
        Leaf("kube-proxy", "system:kube-proxy"),
        Leaf("kubelet", f"system:node:{node}", ("system:nodes",)),
        Leaf("kubelet-server", node, dns=(node,), ips=(layout.NODE_IP,), server=True, client=False),
    ]


def etcd_args(lay: Layout, etcd: Path) -> list[str]:
    # Plain HTTP on the namespace's loopback: only the API server, in the same namespace,
    # can reach it.
    return [
        str(etcd),
        "--name=dkv-kube",
        f"--data-dir={lay.etcd_data}",
        "--listen-client-urls=http://127.0.0.1:2379",
        "--advertise-client-urls=http://127.0.0.1:2379",
        "--listen-peer-urls=http://127.0.0.1:2380",
        "--initial-advertise-peer-urls=http://127.0.0.1:2380",
        "--initial-cluster=dkv-kube=http://127.0.0.1:2380",
        "--listen-metrics-urls=http://127.0.0.1:2381",
        "--quota-backend-bytes=2147483648",
    ]


def apiserver_args(lay: Layout, bin_dir: Path) -> list[str]:
    pki = Pki(lay.pki)
    return [
        str(bin_dir / "kube-apiserver"),
        f"--advertise-address={layout.NODE_IP}",
        f"--bind-address={layout.NODE_IP}",
        f"--secure-port={layout.API_PORT}",
        "--etcd-servers=http://127.0.0.1:2379",
        f"--service-cluster-ip-range={layout.SERVICE_CIDR}",
        "--service-node-port-range=30000-32767",
        f"--tls-cert-file={pki.crt('apiserver')}",
        f"--tls-private-key-file={pki.key('apiserver')}",
        f"--client-ca-file={pki.ca_crt}",
        f"--kubelet-client-certificate={pki.crt('apiserver-kubelet-client')}",
        f"--kubelet-client-key={pki.key('apiserver-kubelet-client')}",
        f"--kubelet-certificate-authority={pki.ca_crt}",
        "--kubelet-preferred-address-types=InternalIP",
        f"--service-account-issuer=https://kubernetes.default.svc.{layout.CLUSTER_DOMAIN}",
        f"--service-account-key-file={pki.sa_pub}",
        f"--service-account-signing-key-file={pki.sa_key}",
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction",
        "--allow-privileged=true",
        "--profiling=false",
        "--anonymous-auth=true",  # /livez, /readyz and /version for probes, as kubeadm
    ]


def controller_manager_args(lay: Layout, bin_dir: Path) -> list[str]:
    pki = Pki(lay.pki)
    kc = lay.config / "controller-manager.kubeconfig"
    return [
        str(bin_dir / "kube-controller-manager"),
        f"--kubeconfig={kc}",
        f"--authentication-kubeconfig={kc}",
        f"--authorization-kubeconfig={kc}",
        "--bind-address=127.0.0.1",
        "--leader-elect=false",
        "--use-service-account-credentials=true",
        f"--cluster-signing-cert-file={pki.ca_crt}",
        f"--cluster-signing-key-file={pki.ca_key}",
        f"--root-ca-file={pki.ca_crt}",
        f"--service-account-private-key-file={pki.sa_key}",
        f"--service-cluster-ip-range={layout.SERVICE_CIDR}",
        "--allocate-node-cidrs=false",  # the CNI's host-local IPAM owns POD_SUBNET
        "--cluster-name=dkv-kube",
        "--profiling=false",
    ]


def scheduler_args(lay: Layout, bin_dir: Path) -> list[str]:
    kc = lay.config / "scheduler.kubeconfig"
    return [
        str(bin_dir / "kube-scheduler"),
        f"--kubeconfig={kc}",
        f"--authentication-kubeconfig={kc}",
        f"--authorization-kubeconfig={kc}",
        "--bind-address=127.0.0.1",
        "--leader-elect=false",
        "--profiling=false",
    ]


def containerd_config(lay: Layout) -> str:
    """containerd 1.6's config (version 2): root, state and socket inside the state dir, the
    CRI plugin with runc (cgroupfs, like the kubelet), our pause image, the CNI dirs."""
    c = lay.containerd
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{c / "root"}"
state = "{c / "state"}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{lay.containerd_socket}"

[ttrpc]
  address = "{c / "containerd.sock.ttrpc"}"

[debug]
  address = "{c / "debug.sock"}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{c / "opt"}"

[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # Pod network namespaces under the state dir, not the machine's /run/netns.
  netns_mounts_under_state_dir = true
  # No CAP_SYS_RESOURCE here: a container may not get a lower OOM score than containerd's
  # own (runc fails "failed to update /proc/self/oom_score_adj" otherwise).
  restrict_oom_score_adj = true
  # Images come from `ctr import` only: there is no registry to pull from.
  max_concurrent_downloads = 1

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
  discard_unpacked_layers = false

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false

[{cri}.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{lay.cni_conf}"
"""


def cni_conflist(lay: Layout) -> str:
    return json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": "dkv-kube",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": layout.BRIDGE,
                    "isGateway": True,
                    "ipMasq": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": layout.POD_SUBNET}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(lay.cni_ipam),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        },
        indent=2,
    )


def kubelet_config(lay: Layout, cgroup_root: str) -> dict[str, Any]:
    pki = Pki(lay.pki)
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": layout.NODE_IP,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki.ca_crt)},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(pki.crt("kubelet-server")),
        "tlsPrivateKeyFile": str(pki.key("kubelet-server")),
        "containerRuntimeEndpoint": f"unix://{lay.containerd_socket}",
        # The machine's cgroup v1 hierarchy, driven directly (no systemd here); pods go under
        # our own cgroup, so they count against the limits of whoever started the cluster.
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": cgroup_root,
        "failCgroupV1": False,
        "failSwapOn": False,
        "podLogsDir": str(lay.pod_logs),
        "clusterDNS": [layout.DNS_SERVICE_IP],
        "clusterDomain": layout.CLUSTER_DOMAIN,
        "resolvConf": str(lay.config / "resolv.conf"),
        # Imported images cannot be pulled again: never collect them, never evict for disk
        # on a shared build machine (the thresholds are the least the kubelet accepts).
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "protectKernelDefaults": False,
        "serializeImagePulls": False,
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "staticPodPath": "",
        "maxPods": 110,
    }


def kube_proxy_config(lay: Layout) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(lay.config / "kube-proxy.kubeconfig")},
        "mode": "iptables",
        "clusterCIDR": layout.POD_CIDR,
        "hostnameOverride": layout.NODE_NAME,
        "bindAddress": layout.NODE_IP,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "nodePortAddresses": [f"{layout.NODE_IP}/32"],
        # conntrack's table size is one number for the whole machine: leave it alone.
        "conntrack": {"maxPerCore": 0, "min": 0},
    }


def storage_manifests(lay: Layout) -> list[dict[str, Any]]:
    """A default StorageClass and PV_COUNT hostPath volumes under the state dir: claims of the
    chart's StatefulSets bind to them (no provisioner runs)."""
    objs: list[dict[str, Any]] = [
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": "local",
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": "kubernetes.io/no-provisioner",
            "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": "Retain",
        }
    ]
    for i in range(layout.PV_COUNT):
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": f"local-{i:02d}"},
                "spec": {
                    "capacity": {"storage": layout.PV_CAPACITY},
                    "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": "local",
                    "hostPath": {"path": str(lay.volumes / f"{i:02d}"), "type": "Directory"},
                },
            }
        )
    return objs
