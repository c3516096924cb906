"""cert-manager/: the chart's issuer chain as standalone manifests, kept equal to the chart's."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.chart.chart import ROOT, pod_spec, render
from tests.chart.crds import validate_custom_resource

MANIFESTS = ROOT / "cert-manager" / "dkv-certificates.yaml"
STANDALONE_NAMESPACE = "dkv"


def _objects(path: Path) -> list[dict[str, object]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


HELM_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")
"""Left out of the standalone manifests: kubectl, not Helm, applies them."""


def test_standalone_manifests_are_the_charts_certificates() -> None:
    chart = render(namespace=STANDALONE_NAMESPACE, show_only="templates/certificates.yaml")
    for obj in chart.objects:
        for label in HELM_LABELS:
            del obj["metadata"]["labels"][label]

    def key(o: dict[str, object]) -> tuple[str, str]:
        return str(o["kind"]), str(o["metadata"]["name"])  # type: ignore[index]

    assert sorted(_objects(MANIFESTS), key=key) == sorted(chart.objects, key=key), (
        "make cert-manager-manifests"
    )


def test_standalone_manifests_match_their_crds() -> None:
    objects = _objects(MANIFESTS)
    assert {o["kind"] for o in objects} == {"Issuer", "Certificate"}
    for obj in objects:
        validate_custom_resource(obj)  # type: ignore[arg-type]


def test_chart_without_cert_manager_mounts_exactly_those_secrets() -> None:
    made = {
        o["spec"]["secretName"]  # type: ignore[index]
        for o in _objects(MANIFESTS)
        if o["kind"] == "Certificate"
    }
    rendered = render({"tls.certManager.enabled": False}, namespace=STANDALONE_NAMESPACE)
    assert not rendered.of_kind("Certificate")
    used = set()
    for w in rendered.workloads():
        for v in pod_spec(w)["volumes"]:
            if "secret" in v:
                used.add(v["secret"]["secretName"])
            for s in v.get("projected", {}).get("sources", []):
                if "secret" in s:
                    used.add(s["secret"]["name"])
    assert used, "no TLS Secrets mounted"
    # Every Secret the pods mount is made; what is made and not mounted is the root CA and
    # the admin's client certificate (for people, not pods).
    assert used <= made
    assert made - used == {"dkv-ca", "dkv-admin-client-tls"}
