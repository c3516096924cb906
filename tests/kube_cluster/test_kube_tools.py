"""The pieces of `make kube-up` that need no cluster: its PKI, kubeconfigs and configuration
files, and that its pinned versions and image names agree across kube/ (in `make test`)."""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import subprocess
import tomllib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kube import configs, layout
from kube.layout import Layout
from kube.pki import Pki, ensure, kubeconfig
from tests.kube_cluster.kube_env import metric_value

REPO = layout.REPO


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_every_leaf_is_signed_by_the_ca_with_the_subject_rbac_expects(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    ensure(pki, configs.leaves())
    ca = _cert(pki.ca_crt)
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    by_name = {leaf.name: leaf for leaf in configs.leaves()}
    for name, leaf in by_name.items():
        cert = _cert(pki.crt(name))
        cert.verify_directly_issued_by(ca)
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        orgs = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
        assert (cn, tuple(orgs)) == (leaf.common_name, leaf.groups)
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert (ExtendedKeyUsageOID.SERVER_AUTH in usages) == leaf.server
        assert (ExtendedKeyUsageOID.CLIENT_AUTH in usages) == leaf.client
    # What Kubernetes' bootstrap policy binds, and what the kubelet's Node authorizer needs.
    assert by_name["kubelet"].common_name == f"system:node:{layout.NODE_NAME}"
    assert by_name["kubelet"].groups == ("system:nodes",)
    assert by_name["admin"].groups == ("system:masters",)
    sans = _cert(pki.crt("apiserver")).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    ips = {str(ip) for ip in sans.value.get_values_for_type(x509.IPAddress)}
    assert {layout.NODE_IP, layout.API_SERVICE_IP} <= ips
    assert "kubernetes.default.svc.cluster.local" in sans.value.get_values_for_type(x509.DNSName)


def test_a_second_ensure_keeps_what_the_running_cluster_trusts(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    ensure(pki, configs.leaves())
    before = {p.name: p.read_bytes() for p in pki.dir.iterdir()}
    ensure(pki, configs.leaves())
    assert {p.name: p.read_bytes() for p in pki.dir.iterdir()} == before
    assert pki.key("admin").stat().st_mode & 0o077 == 0  # private keys are the owner's


def test_a_kubeconfig_embeds_its_client_and_the_ca(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    ensure(pki, configs.leaves())
    config = json.loads(kubeconfig(pki, "admin", "https://10.213.0.2:6443"))
    user = config["users"][0]["user"]
    assert base64.b64decode(user["client-certificate-data"]) == pki.crt("admin").read_bytes()
    assert base64.b64decode(user["client-key-data"]) == pki.key("admin").read_bytes()
    cluster = config["clusters"][0]["cluster"]
    assert base64.b64decode(cluster["certificate-authority-data"]) == pki.ca_crt.read_bytes()
    assert config["current-context"] == config["contexts"][0]["name"]


def test_the_addresses_fit_together() -> None:
    pods = ipaddress.ip_network(layout.POD_CIDR)
    services = ipaddress.ip_network(layout.SERVICE_CIDR)
    link = ipaddress.ip_network(f"{layout.HOST_IP}/{layout.LINK_PREFIX}", strict=False)
    assert ipaddress.ip_network(layout.POD_SUBNET).subnet_of(pods)  # type: ignore[arg-type]
    assert ipaddress.ip_address(layout.API_SERVICE_IP) == next(services.hosts())
    assert ipaddress.ip_address(layout.DNS_SERVICE_IP) in services
    assert ipaddress.ip_address(layout.NODE_IP) in link
    assert not pods.overlaps(services) and not link.overlaps(pods) and not link.overlaps(services)


def test_containerd_and_kubelet_configs_say_what_this_machine_needs(tmp_path: Path) -> None:
    lay = Layout(state=tmp_path / "state", netns="t")
    cri = tomllib.loads(configs.containerd_config(lay))["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["restrict_oom_score_adj"] is True
    assert cri["netns_mounts_under_state_dir"] is True
    assert cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is False
    assert cri["cni"]["conf_dir"] == str(lay.cni_conf)
    kubelet = configs.kubelet_config(lay, "/x/dkv-kube")
    assert kubelet["cgroupDriver"] == "cgroupfs" and kubelet["failCgroupV1"] is False
    assert kubelet["imageGCHighThresholdPercent"] == 100  # imported images cannot be pulled
    assert kubelet["containerRuntimeEndpoint"] == f"unix://{lay.containerd_socket}"
    conflist = json.loads(configs.cni_conflist(lay))
    assert conflist["plugins"][0]["ipam"]["ranges"] == [[{"subnet": layout.POD_SUBNET}]]
    for obj in configs.storage_manifests(lay)[1:]:
        assert Path(obj["spec"]["hostPath"]["path"]).parent == lay.volumes


def _pinned(script: str, name: str) -> str:
    text = (REPO / script).read_text()
    match = re.search(rf"^{name}=(\S+)", text, re.MULTILINE)
    assert match, f"{script} pins no {name}"
    return match.group(1)


def test_the_pause_image_is_the_one_kube_images_builds_from_the_same_release() -> None:
    assert _pinned("kube/build.sh", "K8S_VERSION") == _pinned("kube/images/build.sh", "K8S_VERSION")
    names = subprocess.run(
        [str(REPO / "kube/images/build.sh"), "names", "pause"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert names == [configs.PAUSE_IMAGE]


def test_metric_value_reads_one_sample() -> None:
    text = (
        "# TYPE dkv_raft_is_leader gauge\n"
        'dkv_raft_is_leader{shard="1"} 1.0\n'
        'dkv_raft_is_leader{shard="2"} 0.0\n'
        "dkv_raft_is_leader_other 5\n"
    )
    assert metric_value(text, "dkv_raft_is_leader", shard="2") == 0.0
    assert metric_value(text, "dkv_raft_is_leader") == 1.0
    assert metric_value(text, "dkv_raft_is_leader", shard="3") is None
    assert metric_value(text, "dkv_raft_term") is None
