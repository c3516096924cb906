"""`helm install dkv charts/dkv` on the real single-node Kubernetes of `make kube-up`, and the
platform's own fault tests against its pods (issue 14).

One release for the module, installed by the first test, with cert-manager issuing every
certificate, in the order a user meets them: the pods come up and `helm test` passes; the front
door answers gRPC and HTTP/JSON with cert-manager's certificate; pods are deleted with --force
under a workload through the front door (the client and linearizability checker of
tests/e2e); the release is upgraded, scaled and uninstalled.

Run with `make test-kube` (which brings the cluster up first). In `make test` these skip when
no cluster runs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import dkv
from dkv.client import ClientTls
from dkv.testing.cluster import History, Workload, check, lost_writes, read_back
from dkv.testing.frontdoor import FrontDoorClient
from tests.kube_cluster.kube_env import (
    IMAGE_REPOSITORY,
    NAMESPACE,
    RELEASE,
    REPO,
    VALUES,
    Kube,
    metric_value,
)

pytestmark = pytest.mark.kube

SHARDS = 8  # the chart's membership.shards
EXPECTED = {"node": 3, "membership": 3, "gateway": 2}
OPS = 40


def image_archive(tag: str) -> Path:
    """The dkv image named dkv.local/dkv:TAG (make image's build, cached; a second tag is the
    same layers under another name, which is what a rolling upgrade needs)."""
    done = subprocess.run(
        [str(REPO / "image/build.sh")],
        env={
            **os.environ,
            "DKV_IMAGE_REF": f"{IMAGE_REPOSITORY}:{tag}",
            "DKV_IMAGE_OUT_DIR": str(REPO / "build" / "kube-images"),
        },
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    assert done.returncode == 0, f"image/build.sh exited {done.returncode}"
    return Path(done.stdout.strip().splitlines()[-1])


def version() -> str:
    """The project's version: the image's tag and the chart's appVersion."""
    return dkv.__version__


@pytest.fixture(scope="module")
def kube() -> Kube:
    return Kube.find()


@pytest.fixture(scope="module")
def release(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClientTls]:
    """The installed release; yields the admin client's certificate files (cert-manager's)."""
    kube.import_image(image_archive(version()))
    kube.reset()
    kube.helm(
        "install",
        RELEASE,
        str(REPO / "charts/dkv"),
        "-n",
        NAMESPACE,
        "--create-namespace",
        "-f",
        str(VALUES),
        "--set",
        f"image.tag={version()}",
    )
    kube.wait(lambda: kube.all_ready(EXPECTED), "every pod Ready", timeout_s=600)
    yield kube.client_tls(f"{RELEASE}-admin-client-tls", tmp_path_factory.mktemp("admin"))


def test_every_pod_ready_and_helm_test_passes(kube: Kube, release: ClientTls) -> None:
    out = kube.helm("test", RELEASE, "-n", NAMESPACE, "--logs")
    assert "ok" in out, out


def test_front_door_answers_grpc_and_http_with_cert_managers_certificate(
    kube: Kube, release: ClientTls
) -> None:
    # The certificate the front door presents is the one cert-manager issued into its Secret.
    issued = kube.get("secret", f"{RELEASE}-envoy-tls")["data"]["tls.crt"]
    assert ssl.PEM_cert_to_DER_cert(presented(kube)) == ssl.PEM_cert_to_DER_cert(
        base64.b64decode(issued).decode()
    )

    async def grpc_put_get() -> None:
        async with FrontDoorClient(kube.front_door, SHARDS, release) as client:
            deadline = asyncio.get_running_loop().time() + 30
            put = await client.put(b"kube/grpc", b"through-envoy", "kube-grpc-1", deadline)
            assert put is not None and put.header.revision > 0
            got = await client.get(b"kube/grpc", deadline)
            assert got is not None and [kv.value for kv in got.kvs] == [b"through-envoy"]

    asyncio.run(grpc_put_get())

    ctx = ssl.create_default_context(cafile=release.trusted_ca_file)
    ctx.load_cert_chain(release.cert_file, release.key_file)
    key = base64.b64encode(b"kube/http").decode()
    body = json.dumps({"key": key, "value": base64.b64encode(b"json").decode()}).encode()
    req = urllib.request.Request(
        f"https://{kube.front_door}/v1/kv:put",
        data=body,
        method="POST",
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
        assert resp.status == 200
    req = urllib.request.Request(
        f"https://{kube.front_door}/v1/kv:range",
        data=json.dumps({"key": key}).encode(),
        method="POST",
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
        kvs = json.loads(resp.read())["kvs"]
    assert base64.b64decode(kvs[0]["value"]) == b"json"


# -- pods deleted under load -----------------------------------------------------------------


async def under_load(
    kube: Kube,
    tls: ClientTls,
    fault: Callable[[], Awaitable[None]],
    label: str,
    seed: int,
    *,
    tolerate_unavailable: bool = False,
) -> None:
    """A workload through the front door before, during and after ``fault()``; then every
    acknowledged write is read back and the history must be linearizable.

    Only a gateway pod's deletion may fail calls (``tolerate_unavailable``): Envoy runs in
    that pod, so calls in flight on its connections end UNAVAILABLE (their writes count as
    of unknown outcome for the checker); nothing else may fail."""
    history = History()
    async with FrontDoorClient(kube.front_door, SHARDS, tls) as client:
        work = Workload(
            client,  # type: ignore[arg-type]
            history,
            workers=4,
            ops_per_worker=None,
            keys=6,
            prefix=f"{label}/".encode(),
            op_timeout_s=15.0,
            seed=seed,
        )
        task = asyncio.create_task(work.run())
        try:
            await work.wait_succeeded(OPS // 2, timeout_s=120)
            await fault()
            done = work.succeeded
            await work.wait_succeeded(done + OPS, timeout_s=300)
        finally:
            work.stop()
            await task
        if tolerate_unavailable:
            assert all(": UNAVAILABLE:" in e for e in history.errors), history.errors
            assert len(history.errors) <= 2 * work.workers, history.errors
        else:
            assert not history.errors, f"{label}: calls failed: {history.errors}"
        final = await read_back(client, history, work.key_set())  # type: ignore[arg-type]
    assert not lost_writes(history.acked, final)
    check(history, context=label)


def delete_force(kube: Kube, pod: str) -> str:
    """Delete POD at once (no grace), as a node failure would; returns its UID."""
    uid: str = kube.get("pod", pod)["metadata"]["uid"]
    kube.kubectl("delete", "pod", pod, "-n", NAMESPACE, "--force", "--grace-period=0")
    return uid


def wait_replaced(kube: Kube, pod: str, old_uid: str) -> None:
    def back() -> bool:
        try:
            p = kube.get("pod", pod)
        except AssertionError:
            return False
        return bool(p["metadata"]["uid"] != old_uid and kube.ready(p))

    kube.wait(back, f"{pod} back and Ready", timeout_s=300)


def test_a_node_pod_deleted_under_load_comes_back_with_its_volume(
    kube: Kube, release: ClientTls
) -> None:
    pod = f"{RELEASE}-node-1"
    claim_before = kube.get("pvc", f"data-{pod}")["metadata"]["uid"]
    uids: list[str] = []

    async def fault() -> None:
        uids.append(delete_force(kube, pod))

    asyncio.run(under_load(kube, release, fault, "node", 1))
    wait_replaced(kube, pod, uids[0])
    assert kube.get("pvc", f"data-{pod}")["metadata"]["uid"] == claim_before
    # It rejoined: its Raft groups have a leader again from its own view.
    text = kube.metrics(pod, 2381)
    assert metric_value(text, "dkv_raft_has_leader") == 1.0, "the node sees no leader"


def membership_leader(kube: Kube) -> str:
    leaders = []
    for p in kube.pods("membership"):
        name = p["metadata"]["name"]
        text = kube.metrics(name, 2481)
        if metric_value(text, "dkv_raft_is_leader") == 1.0:
            leaders.append(name)
    assert len(leaders) == 1, f"membership leaders: {leaders}"
    return leaders[0]


def test_the_membership_leaders_pod_deleted_under_load(kube: Kube, release: ClientTls) -> None:
    uids: list[str] = []
    names: list[str] = []

    async def fault() -> None:
        names.append(membership_leader(kube))
        uids.append(delete_force(kube, names[0]))

    asyncio.run(under_load(kube, release, fault, "membership", 2))
    wait_replaced(kube, names[0], uids[0])
    kube.wait(lambda: kube.all_ready(EXPECTED), "every pod Ready")


def test_a_gateway_pod_deleted_under_load(kube: Kube, release: ClientTls) -> None:
    uids: list[str] = []

    async def fault() -> None:
        uids.append(delete_force(kube, kube.pods("gateway")[0]["metadata"]["name"]))

    asyncio.run(under_load(kube, release, fault, "gateway", 3, tolerate_unavailable=True))
    kube.wait(
        lambda: (
            kube.all_ready(EXPECTED)
            and uids[0] not in [p["metadata"]["uid"] for p in kube.pods("gateway")]
        ),
        "a new gateway pod Ready",
    )


# -- upgrades, scaling, certificates, uninstall ----------------------------------------------


def upgrade(kube: Kube, *settings: str) -> None:
    """`helm upgrade` of the release with its values and SETTINGS (key=value) on top."""
    args = ["upgrade", RELEASE, str(REPO / "charts/dkv"), "-n", NAMESPACE, "--reuse-values"]
    for setting in settings:
        args += ["--set", setting]
    kube.helm(*args)


def images_in_use(kube: Kube) -> set[str]:
    return {
        c["image"]
        for p in kube.pods()
        for c in p["spec"]["containers"]
        if c["image"].startswith(IMAGE_REPOSITORY)
    }


def rolled_out(kube: Kube, image: str) -> bool:
    """Every pod of the release runs IMAGE and is Ready, and no old pod is left."""
    return kube.all_ready(EXPECTED) and images_in_use(kube) == {image}


def test_a_rolling_upgrade_to_a_rebuilt_image_fails_no_request(
    kube: Kube, release: ClientTls
) -> None:
    tag = f"{version()}-rolled"
    kube.import_image(image_archive(tag))
    new_image = f"{IMAGE_REPOSITORY}:{tag}"

    async def roll() -> None:
        upgrade(kube, f"image.tag={tag}")
        # The workload runs on while the StatefulSets and the Deployment roll, one pod at a
        # time; the phase ends only once every pod runs the new image.
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            None, lambda: kube.wait(lambda: rolled_out(kube, new_image), "rolled out", 900)
        )

    asyncio.run(under_load(kube, release, roll, "upgrade", 4))


def shards_on(kube: Kube, pod: str) -> set[str]:
    """The shards whose Raft group runs on POD (from its /metrics)."""
    return {
        sample.labels["shard"]
        for family in text_string_to_metric_families(kube.metrics(pod, 2381))
        for sample in family.samples
        if sample.name == "dkv_raft_applied_index" and "shard" in sample.labels
    }


def test_scaling_nodes_to_four_places_replicas_on_the_new_pod(
    kube: Kube, release: ClientTls
) -> None:
    upgrade(kube, "node.replicas=4")
    EXPECTED["node"] = 4
    new = f"{RELEASE}-node-3"
    kube.wait(lambda: kube.all_ready(EXPECTED), f"{new} Ready")
    kube.wait(lambda: len(shards_on(kube, new)) > 0, f"membership placed a replica on {new}")

    # Every shard still has a leader and three voters: dkvctl status exits 0 only then.
    def healthy() -> bool:
        done = subprocess.run(
            [
                str(Path(sys.executable).parent / "dkvctl"),
                f"--endpoints={kube.front_door}",
                f"--cacert={release.trusted_ca_file}",
                f"--cert={release.cert_file}",
                f"--key={release.key_file}",
                "status",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        return done.returncode == 0

    kube.wait(healthy, "every shard led and fully replicated (dkvctl status)")


def presented(kube: Kube) -> str:
    """The certificate the front door presents (PEM)."""
    host, port = kube.front_door.split(":")
    return ssl.get_server_certificate((host, int(port)))


def certificate_revisions(kube: Kube) -> dict[str, int]:
    items = kube.get("certificates.cert-manager.io")["items"]
    return {c["metadata"]["name"]: int(c.get("status", {}).get("revision", 0)) for c in items}


def test_short_lived_certificates_are_renewed_under_traffic_without_a_failed_request(
    kube: Kube, release: ClientTls
) -> None:
    """cert-manager's shortest allowed lifetime (1 h) renewed 10 s after each issue: every
    component certificate is replaced (new keys: rotationPolicy Always) more than once while
    the workload runs, and no call fails. (The root CA keeps its own lifetime.)"""
    before = {
        name: rev for name, rev in certificate_revisions(kube).items() if name != f"{RELEASE}-ca"
    }
    presented_before = presented(kube)

    async def renew() -> None:
        upgrade(kube, "tls.certManager.duration=1h", "tls.certManager.renewBefore=59m50s")
        # The certificates in place keep their 90 days until renewed once: renew each now;
        # from then on each lives an hour and is renewed 10 s after it was issued.
        for name in before:
            kube.renew_certificate(name)
        loop = asyncio.get_running_loop()

        def renewed_twice() -> bool:
            now = certificate_revisions(kube)
            return all(now.get(name, 0) >= rev + 2 for name, rev in before.items())

        await loop.run_in_executor(
            None, lambda: kube.wait(renewed_twice, "every certificate renewed twice", 600)
        )

        # The kubelet refreshes mounted Secrets on its periodic pod sync (a minute or two
        # behind the Secret); Envoy then takes the new files by SDS, still under load.
        def front_door_renewed() -> bool:
            return presented(kube) != presented_before

        await loop.run_in_executor(
            None, lambda: kube.wait(front_door_renewed, "the front door presents a renewed one")
        )

    asyncio.run(under_load(kube, release, renew, "certs", 5))
    upgrade(kube, "tls.certManager.duration=2160h", "tls.certManager.renewBefore=720h")


def test_helm_uninstall_removes_everything_but_the_volume_claims(
    kube: Kube, release: ClientTls
) -> None:
    claims = {c["metadata"]["name"] for c in kube.get("pvc")["items"]}
    assert len(claims) == EXPECTED["node"] + EXPECTED["membership"]
    kube.helm("uninstall", RELEASE, "-n", NAMESPACE, "--wait", "--timeout=300s")
    selector = f"app.kubernetes.io/instance={RELEASE}"
    kinds = (
        "pods,services,statefulsets,deployments,configmaps,secrets,serviceaccounts,"
        "poddisruptionbudgets,networkpolicies,certificates.cert-manager.io,"
        "issuers.cert-manager.io,roles,rolebindings"
    )

    def left() -> list[str]:
        objs = [
            f"{o['kind']}/{o['metadata']['name']}" for o in kube.get(kinds, "-l", selector)["items"]
        ]
        # What cert-manager wrote (the Certificates' Secrets) goes with its owner.
        objs += [
            f"Secret/{s['metadata']['name']}"
            for s in kube.get("secrets")["items"]
            if s["metadata"]["name"].startswith(f"{RELEASE}-")
        ]
        return objs

    # Pods end after their grace period (a gateway drains first), owned objects by the
    # garbage collector: wait for both, then nothing may be left.
    try:
        kube.wait(lambda: not left(), "everything of the release gone")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; left behind by helm uninstall: {left()}") from None
    assert {c["metadata"]["name"] for c in kube.get("pvc")["items"]} == claims
