"""charts/dkv with real Helm: lint, render a matrix of values, check every object against the
Kubernetes schemas (kubernetes-validate, two releases) or its CRD's schema (tests/chart/crds),
and check what schemas cannot see: ports, probes, certificate names, quorum, flags.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.chart import (
    CHART,
    NAMESPACE,
    RELEASE,
    ROOT,
    Rendered,
    pod_labels,
    pod_spec,
    run_helm,
)
from tests.chart.chart import render as _render
from tests.chart.crds import validate_custom_resource

KUBERNETES_VERSIONS = ("1.35.0", "1.37.0")
"""Two supported Kubernetes releases (kubernetes-validate bundles their OpenAPI schemas)."""
CLUSTER_DOMAIN = "cluster.local"


SHORT = {
    "tls.certManager.enabled": "certManager",
    "metrics.serviceMonitor.enabled": "serviceMonitor",
    "metrics.prometheusRule.enabled": "prometheusRule",
    "networkPolicy.enabled": "networkPolicy",
    "membership.replicas": "membership",
    "node.replicas": "nodes",
    "dev.liveUpdate.enabled": "liveUpdate",
    "tracing.otlpEndpoint": "otlp",
    "tracing.sampleRatio": "sampleRatio",
}


def case_id(values: dict[str, Any]) -> str:
    return ",".join(f"{SHORT.get(k, k)}={v}" for k, v in values.items()) or "defaults"


# The matrix: cert-manager on/off, monitoring on/off, NetworkPolicies on/off, 1 and 3
# membership replicas, 3 and 5 nodes (every combination: 32 renders).
MATRIX = [
    {
        "tls.certManager.enabled": cm,
        "metrics.serviceMonitor.enabled": mon,
        "metrics.prometheusRule.enabled": mon,
        "networkPolicy.enabled": np_,
        "membership.replicas": m,
        "node.replicas": n,
    }
    for cm, mon, np_, m, n in itertools.product(
        (True, False), (True, False), (True, False), (1, 3), (3, 5)
    )
]
# tilt/Tiltfile's dev loop: live update (an init container, a volume, the restarter) and traces.
DEV = {
    "dev.liveUpdate.enabled": True,
    "tracing.otlpEndpoint": "http://jaeger:4317",
    "tracing.sampleRatio": 0.25,
}
CASES = [{}, DEV, *MATRIX]


@functools.cache
def _cached(key: str) -> Rendered:
    return _render(json.loads(key))


def render(values: dict[str, Any]) -> Rendered:
    return _cached(json.dumps(values, sort_keys=True))


# -- lint ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        {},
        {
            "networkPolicy.enabled": True,
            "metrics.serviceMonitor.enabled": True,
            "metrics.prometheusRule.enabled": True,
            "frontDoor.service.type": "LoadBalancer",
        },
    ],
    ids=["defaults", "everything-on"],
)
def test_helm_lint_strict(values: dict[str, Any]) -> None:
    from tests.chart.chart import set_args

    out = run_helm("lint", "--strict", str(CHART), *set_args(values))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


# -- schemas ------------------------------------------------------------------------------------

BUILT_IN_GROUPS = ("v1", "apps/v1", "policy/v1", "networking.k8s.io/v1")
_VALID: set[str] = set()  # objects (as JSON) this process has found valid


@pytest.mark.parametrize("values", CASES, ids=[case_id(c) for c in CASES])
def test_every_object_matches_its_schema(values: dict[str, Any]) -> None:
    import kubernetes_validate

    rendered = render(values)
    assert rendered.objects
    for obj in rendered.objects:
        what = f"{obj['kind']} {obj['metadata']['name']}"
        text = json.dumps(obj, sort_keys=True)
        if text in _VALID:
            continue  # the same object in another case (about 25 ms a validation)
        if obj["apiVersion"] in BUILT_IN_GROUPS:
            for version in KUBERNETES_VERSIONS:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    pytest.fail(f"{what} is invalid for Kubernetes {version}: {exc}")
        else:
            validate_custom_resource(obj)
        _VALID.add(text)


# -- what schemas cannot see --------------------------------------------------------------------


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def flags(container: dict[str, Any]) -> dict[str, str]:
    """``--flag=value`` arguments as a dict (every dkv flag in the chart is written so)."""
    out = {}
    for arg in container.get("args", []):
        if arg.startswith("--") and "=" in arg:
            k, v = arg[2:].split("=", 1)
            out[k] = v
    return out


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def host_of(address: str) -> str:
    return address.rpartition(":")[0]


def pod_names(workload: dict[str, Any]) -> list[str]:
    if workload["kind"] != "StatefulSet":
        return [workload["metadata"]["name"]]
    name = workload["metadata"]["name"]
    return [f"{name}-{i}" for i in range(workload["spec"]["replicas"])]


def expand(text: str, pod: str) -> str:
    return text.replace("$(POD_NAME)", pod).replace("$(POD_NAMESPACE)", NAMESPACE)


@pytest.mark.parametrize("values", CASES, ids=[case_id(c) for c in CASES])
def test_services_name_ports_their_pods_declare(values: dict[str, Any]) -> None:
    rendered = render(values)
    for svc in rendered.of_kind("Service"):
        selector = svc["spec"]["selector"]
        selected = [w for w in rendered.workloads() if selector.items() <= pod_labels(w).items()]
        assert selected, f"Service {svc['metadata']['name']} selects no pods"
        for w in selected:
            declared = {p.get("name") for c in containers(w) for p in c.get("ports", [])}
            declared |= {p["containerPort"] for c in containers(w) for p in c.get("ports", [])}
            for port in svc["spec"]["ports"]:
                assert port["targetPort"] in declared, (
                    f"Service {svc['metadata']['name']} sends port {port['name']} to "
                    f"{port['targetPort']!r}, which {w['kind']} {w['metadata']['name']} lacks"
                )


def served_ports(workload: dict[str, Any], rendered: Rendered) -> dict[str, tuple[str, int]]:
    """Container port name -> (host, port) the process in that pod listens on, from its flags
    (and Envoy's static stats listener, from its bootstrap)."""
    out: dict[str, tuple[str, int]] = {}
    if workload["kind"] == "Deployment":
        cm = rendered.get("ConfigMap", f"{RELEASE}-gateway-envoy")
        bootstrap = yaml.safe_load(cm["data"]["bootstrap.yaml"])
        for listener in bootstrap["static_resources"].get("listeners", []):
            address = listener["address"]["socket_address"]
            if listener["name"] == "dkv_envoy_stats":
                out["envoy-metrics"] = (address["address"], address["port_value"])
    for c in containers(workload):
        f = flags(c)
        for flag, name in (
            ("listen-client", "client"),
            ("listen-peer", "peer"),
            ("listen-metrics", "metrics"),
        ):
            if flag in f:
                out[name] = (host_of(f[flag]), port_of(f[flag]))
        if "envoy-port" in f:
            out["front-door"] = (f["envoy-listen-host"], int(f["envoy-port"]))
    return out


@pytest.mark.parametrize("values", CASES, ids=[case_id(c) for c in CASES])
def test_probes_and_container_ports_are_ports_the_processes_serve(values: dict[str, Any]) -> None:
    rendered = render(values)
    for w in rendered.workloads():
        if w["kind"] == "Pod":
            continue
        served = served_ports(w, rendered)
        for c in pod_spec(w)["containers"]:  # init containers serve nothing and are not probed
            declared = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for name, number in declared.items():
                assert name in served, f"{c['name']} declares port {name}, which nothing serves"
                host, port = served[name]
                assert port == number, f"{c['name']}: port {name} is {number}, served on {port}"
                # A Service or the kubelet reaches the pod's IP, never its loopback.
                assert host == "0.0.0.0", f"{c['name']}: {name} listens on {host} only"
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert probe in c, f"{w['metadata']['name']}/{c['name']} has no {probe}"
                spec = c[probe]
                action = spec.get("httpGet") or spec.get("tcpSocket") or spec.get("grpc")
                assert action is not None, f"{c['name']} {probe}: no action"
                port = action["port"]
                assert port in declared or port in declared.values(), (
                    f"{c['name']} {probe} hits port {port}, not one the container declares"
                )
                if "httpGet" in spec:
                    # dkv's HTTP endpoints are on --listen-metrics (dkv.telemetry.http).
                    assert port == "metrics", f"{c['name']} {probe}: HTTP probe on {port}"
                    assert spec["httpGet"]["path"] in ("/livez", "/readyz")
            if c["name"] in ("node", "membership", "gateway"):
                assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
                assert c["livenessProbe"]["httpGet"]["path"] == "/livez"


def certificates(rendered: Rendered) -> dict[str, dict[str, Any]]:
    """secretName -> Certificate spec."""
    return {c["spec"]["secretName"]: c["spec"] for c in rendered.of_kind("Certificate")}


def covers(dns_names: list[str], host: str) -> bool:
    """TLS name matching: exact, or a wildcard in the left-most label matching one label."""
    for name in dns_names:
        if name == host:
            return True
        if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]:
            return True
    return False


def tls_secret_for(workload: dict[str, Any], pod: str, directory: str) -> str:
    """The Secret whose files a pod sees in ``directory`` (e.g. /etc/dkv/tls/<pod>)."""
    spec = pod_spec(workload)
    mounts = {m["name"]: m for c in containers(workload) for m in c.get("volumeMounts", [])}
    for volume in spec["volumes"]:
        mount = mounts.get(volume["name"])
        if mount is None:
            continue
        assert "subPath" not in mount, "a subPath mount never sees a rotated certificate"
        if "secret" in volume and mount["mountPath"] == directory:
            return str(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" not in source:
                continue
            paths = {f"{mount['mountPath']}/{i['path']}" for i in source["secret"]["items"]}
            if f"{directory}/tls.crt" in paths:
                assert {f"{directory}/tls.key", f"{directory}/ca.crt"} <= paths
                return str(source["secret"]["name"])
    raise AssertionError(f"{pod}: no Secret is mounted at {directory}")


@pytest.mark.parametrize(
    "values",
    [c for c in CASES if c.get("tls.certManager.enabled", True)],
    ids=[case_id(c) for c in CASES if c.get("tls.certManager.enabled", True)],
)
def test_certificates_cover_the_names_and_identities_processes_use(values: dict[str, Any]) -> None:
    rendered = render(values)
    certs = certificates(rendered)
    for cert in certs.values():
        if "uris" in cert:
            assert cert["privateKey"]["rotationPolicy"] == "Always"
            assert "server auth" in cert["usages"] or "client auth" in cert["usages"]
    by_pod: dict[str, dict[str, Any]] = {}
    for kind in ("membership", "node"):
        sts = rendered.get("StatefulSet", f"{RELEASE}-{kind}")
        (c,) = [c for c in containers(sts) if c["name"] == kind]
        f = flags(c)
        td = f["trust-domain"]
        for pod in pod_names(sts):
            cert_dir = expand(f["cert-file"].rsplit("/", 1)[0], pod)
            secret = tls_secret_for(sts, pod, cert_dir)
            assert expand(f["peer-cert-file"], pod) == f"{cert_dir}/tls.crt"
            spec = certs[secret]
            by_pod[pod] = spec
            # The identity peers check: spiffe://<td>/<kind>/<the --name it runs with>.
            assert spec["uris"] == [f"spiffe://{td}/{kind}/{expand(f['name'], pod)}"]
            for flag in ("advertise-client", "advertise-peer"):
                host = host_of(expand(f[flag], pod))
                assert covers(spec["dnsNames"], host), f"{pod}'s certificate lacks {host}"
    # Everyone dials membership replicas by the names in --membership / --initial-cluster.
    dialers = [*rendered.of_kind("StatefulSet"), *rendered.of_kind("Deployment")]
    for w in dialers:
        for c in containers(w):
            f = flags(c)
            for address in filter(None, f.get("membership", "").split(",")):
                host = host_of(address)
                pod = host.split(".")[0]
                assert covers(by_pod[pod]["dnsNames"], host), f"{pod}'s certificate lacks {host}"
            for entry in filter(None, f.get("initial-cluster", "").split(",")):
                name, _, address = entry.partition("=")
                assert covers(by_pod[name]["dnsNames"], host_of(address))
    gateway = rendered.get("Deployment", f"{RELEASE}-gateway")
    (gw,) = [c for c in containers(gateway) if c["name"] == "gateway"]
    f = flags(gw)
    td = f["trust-domain"]
    assert certs[tls_secret_for(gateway, "gateway", "/etc/dkv/tls/gateway")]["uris"] == [
        f"spiffe://{td}/gateway"
    ]
    envoy = certs[tls_secret_for(gateway, "envoy", "/etc/dkv/tls/envoy")]
    assert envoy["uris"] == [f"spiffe://{td}/envoy"]
    for name in (
        RELEASE,
        f"{RELEASE}.{NAMESPACE}.svc",
        f"{RELEASE}.{NAMESPACE}.svc.{CLUSTER_DOMAIN}",
    ):
        assert covers(envoy["dnsNames"], name), f"the front door's certificate lacks {name}"
    test_pod = rendered.get("Pod", f"{RELEASE}-test-front-door")
    env = {e["name"]: e.get("value") for e in pod_spec(test_pod)["containers"][0]["env"]}
    assert covers(envoy["dnsNames"], host_of(env["DOOR"]))
    client = certs[tls_secret_for(test_pod, "test", "/etc/dkv/tls/client")]
    assert client["uris"] == [f"spiffe://{td}/user/helm-test"]
    # One issuer chain: self-signed root -> CA Issuer -> every certificate.
    issuers = {i["metadata"]["name"]: i["spec"] for i in rendered.of_kind("Issuer")}
    ca_issuer = issuers[f"{RELEASE}-ca"]["ca"]["secretName"]
    root = certs[ca_issuer]
    assert root["isCA"] is True and "selfSigned" in issuers[root["issuerRef"]["name"]]
    for secret, spec in certs.items():
        if secret != ca_issuer:
            assert spec["issuerRef"]["name"] == f"{RELEASE}-ca", secret


@pytest.mark.parametrize("values", CASES, ids=[case_id(c) for c in CASES])
def test_disruption_budgets_keep_a_quorum(values: dict[str, Any]) -> None:
    rendered = render(values)
    pdbs = {p["metadata"]["name"]: p["spec"] for p in rendered.of_kind("PodDisruptionBudget")}
    membership = rendered.get("StatefulSet", f"{RELEASE}-membership")
    replicas = membership["spec"]["replicas"]
    pdb = pdbs[f"{RELEASE}-membership"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels(membership).items()
    # At most (n - 1) / 2 replicas away: a majority of the Raft group stays.
    assert pdb["minAvailable"] == replicas // 2 + 1
    (m,) = pod_spec(membership)["containers"]
    factor = int(flags(m)["replication-factor"])
    nodes = rendered.get("StatefulSet", f"{RELEASE}-node")
    pdb = pdbs[f"{RELEASE}-node"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels(nodes).items()
    # A shard's replicas are on distinct nodes: (factor - 1) / 2 nodes away leave each a majority.
    assert pdb["maxUnavailable"] == (factor - 1) // 2
    assert factor // 2 + 1 <= factor - pdb["maxUnavailable"]


@functools.cache
def help_flags(binary: str) -> frozenset[str]:
    """Every --flag a program's --help names."""
    out = subprocess.run([binary, "--help"], capture_output=True, text=True, check=False)
    text = out.stdout + out.stderr
    return frozenset(re.findall(r"(--[a-z][a-z0-9-]*)", text))


def program(command: str) -> str:
    if command == "envoy":
        from dkv.devstack import envoy_binary

        return envoy_binary()
    path = Path(sys.executable).parent / command
    assert path.is_file(), f"{command} is not installed in the virtualenv"
    return str(path)


def _fake_files(args: list[str], pod: str, tmp: Path) -> list[str]:
    """The container's args with $(POD_NAME) expanded and /etc, /var paths moved under ``tmp``,
    where the TLS files the parsers check for exist."""
    out = []
    for arg in args:
        arg = expand(arg, pod)
        arg = re.sub(r"(?<==)/(etc|var)/", lambda m: f"{tmp}/{m.group(1)}/", arg)
        if re.match(r"--[a-z-]*(cert|key|ca)-file=", arg):
            path = Path(arg.split("=", 1)[1])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        out.append(arg)
    return out


DEVRELOAD = ["python", "-I", "-m", "dkv.cli.devreload"]


def unwrap(command: list[str]) -> list[str]:
    """A container's command without dev.liveUpdate's restarter (whose own arguments must be
    ones it accepts)."""
    if command[: len(DEVRELOAD)] != DEVRELOAD:
        return command
    from dkv.cli.devreload import _parser

    args = _parser().parse_args(command[len(DEVRELOAD) :])
    assert args.what == "run", command
    assert args.command[0] == "--" and len(args.command) > 1, command
    return list(args.command[1:])


@pytest.mark.parametrize(
    "values",
    [{}, {"membership.replicas": 1, "node.replicas": 5}, DEV],
    ids=["defaults", "1-membership-5-nodes", "dev"],
)
def test_every_flag_is_one_the_process_accepts(values: dict[str, Any], tmp_path: Path) -> None:
    from dkv_gateway.main import parse_args as gateway_args
    from dkv_membership.main import parse_args as membership_args
    from dkv_node.main import parse_args as node_args

    parsers = {
        "dkv-node": node_args,
        "dkv-membership": membership_args,
        "dkv-gateway": gateway_args,
    }
    rendered = render(values)
    seen = set()
    for w in rendered.workloads():
        for c in pod_spec(w)["containers"]:
            command = unwrap(c["command"])[0]
            if command == "/bin/sh":  # the test hook: dkvctl, checked below
                continue
            seen.add(command)
            accepted = help_flags(program(command))
            for arg in c.get("args", []):
                if not arg.startswith("--"):
                    continue  # a value ("--flag value")
                name = arg.split("=", 1)[0]
                assert name in accepted, f"{command} --help does not know {name}"
                # Envoy's parser (TCLAP) refuses "--flag=value"; the values are checked by
                # test_envoy_accepts_the_rendered_bootstrap, which runs these very arguments.
                assert command != "envoy" or "=" not in arg, f"envoy cannot parse {arg}"
            if command in parsers:
                # Values too: the process's own parser (exit 2 on misuse).
                args = _fake_files(c["args"], pod_names(w)[0], tmp_path)
                try:
                    parsers[command](args)
                except SystemExit as exc:
                    pytest.fail(f"{command} refuses {args}: exit {exc.code}")
    assert seen == {"dkv-node", "dkv-membership", "dkv-gateway", "envoy"}
    # The hook's dkvctl commands and options.
    hook = rendered.get("Pod", f"{RELEASE}-test-front-door")
    script = hook["spec"]["containers"][0]["args"][0]
    dkvctl = program("dkvctl")
    for sub in ("put", "get"):
        assert f'dkvctl --endpoints "$DOOR" {sub} ' in script
        out = subprocess.run([dkvctl, sub, "--help"], capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr
    env = {e["name"] for e in hook["spec"]["containers"][0]["env"]}
    assert {"DKVCTL_CACERT", "DKVCTL_CERT", "DKVCTL_KEY"} <= env


def test_gateway_envoy_listen_host_flag() -> None:
    from dkv_gateway.main import parse_args

    cfg = parse_args(["--membership", "m:1", "--envoy-listen-host", "0.0.0.0"])
    assert cfg.envoy_listen_host == "0.0.0.0"
    assert parse_args(["--membership", "m:1"]).envoy_listen_host == "127.0.0.1"


@pytest.mark.parametrize("values", CASES, ids=[case_id(c) for c in CASES])
def test_pods_run_restricted(values: dict[str, Any]) -> None:
    rendered = render(values)
    for w in rendered.workloads():
        spec = pod_spec(w)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        for c in containers(w):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert "resources" in c and c["resources"]["requests"]
        if w["kind"] == "StatefulSet":
            assert w["spec"]["podManagementPolicy"] == "Parallel"
            claims = {t["metadata"]["name"] for t in w["spec"]["volumeClaimTemplates"]}
            mounts = {m["name"] for c in containers(w) for m in c["volumeMounts"]}
            assert claims <= mounts
            headless = rendered.get("Service", w["spec"]["serviceName"])
            assert headless["spec"]["clusterIP"] == "None"
            assert headless["spec"]["publishNotReadyAddresses"] is True
            assert "topologySpreadConstraints" in spec and "podAntiAffinity" in spec["affinity"]


def _ports_by_pod(rendered: Rendered, selector: dict[str, str]) -> set[str]:
    return {
        p["name"]
        for w in rendered.workloads()
        if selector.items() <= pod_labels(w).items()
        for c in containers(w)
        for p in c.get("ports", [])
    }


@pytest.mark.parametrize(
    "values",
    [c for c in CASES if c.get("networkPolicy.enabled")],
    ids=[case_id(c) for c in CASES if c.get("networkPolicy.enabled")],
)
def test_network_policies_admit_the_right_components(values: dict[str, Any]) -> None:
    rendered = render(values)
    policies = {p["metadata"]["name"]: p["spec"] for p in rendered.of_kind("NetworkPolicy")}
    assert set(policies) == {f"{RELEASE}-{c}" for c in ("membership", "node", "gateway")}

    def component(spec_selector: dict[str, Any]) -> str:
        return str(spec_selector["matchLabels"]["app.kubernetes.io/component"])

    for spec in policies.values():
        own = spec["podSelector"]["matchLabels"]
        ports = _ports_by_pod(rendered, own)
        allowed: dict[str, set[str]] = {}
        for rule in spec["ingress"]:
            for port in rule["ports"]:
                assert port["port"] in ports, f"a policy names port {port['port']} of no pod"
                peers = rule.get("from")
                # No "from": every peer ("*").
                allowed[port["port"]] = (
                    {"*"} if peers is None else {component(p["podSelector"]) for p in peers}
                )
        me = own["app.kubernetes.io/component"]
        if me in ("node", "membership"):
            assert allowed["peer"] == {me}
            assert allowed["client"] == {"node", "membership", "gateway"}
        else:
            assert allowed["front-door"] == {"*"}
        assert allowed["metrics"] == {"*"}


# -- the contents: Envoy's bootstrap, the policy, dashboards, alerts, versions -------------------


def envoy_paths(rendered: Rendered) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    gateway = rendered.get("Deployment", f"{RELEASE}-gateway")
    (envoy,) = [c for c in containers(gateway) if c["name"] == "envoy"]
    (gw,) = [c for c in containers(gateway) if c["name"] == "gateway"]
    cm = rendered.get("ConfigMap", f"{RELEASE}-gateway-envoy")
    return envoy, gw, cm["data"]


def test_envoy_bootstrap_is_what_envoy_config_makes(tmp_path: Path) -> None:
    from dkv_gateway import envoy_config

    rendered = render({})
    envoy, gw, data = envoy_paths(rendered)
    f = flags(gw)
    # The files Envoy is told to read are where the pod mounts them.
    config_path = envoy["args"][envoy["args"].index("--config-path") + 1]
    mount = {m["name"]: m["mountPath"] for m in envoy["volumeMounts"]}
    volume = next(
        v
        for v in pod_spec(rendered.get("Deployment", f"{RELEASE}-gateway"))["volumes"]
        if v["name"] == "envoy-config"
    )
    mounted = {
        f"{mount['envoy-config']}/{i['path']}": i["key"] for i in volume["configMap"]["items"]
    }
    assert mounted[config_path] == "bootstrap.yaml"
    tls_dir = "/etc/dkv/tls/envoy"
    assert f["envoy-cert-file"] == f"{tls_dir}/tls.crt" and mount["envoy-tls"] == tls_dir
    # The gateway writes Envoy's listener and upstream SDS files where Envoy reads them.
    envoy_mounts = {m["mountPath"]: m["name"] for m in envoy["volumeMounts"]}
    gateway_mounts = {m["mountPath"]: m["name"] for m in gw["volumeMounts"]}
    assert envoy_mounts[f["envoy-sds-dir"]] == gateway_mounts[f["envoy-sds-dir"]] == "envoy-sds"
    sds_dir = "/etc/envoy/sds"
    assert mounted[f"{sds_dir}/dkv_ads_cert.json"] == "dkv_ads_cert.json"
    ads_tls = envoy_config.TlsFiles(f"{tls_dir}/tls.crt", f"{tls_dir}/tls.key", f"{tls_dir}/ca.crt")
    stats_port = next(p["containerPort"] for p in envoy["ports"] if p["name"] == "envoy-metrics")
    expected = envoy_config.bootstrap(
        stats_port=stats_port,
        ads_host=host_of(f["listen-xds"]),
        ads_port=port_of(f["listen-xds"]),
        admin_port=2376,
        ads_tls=ads_tls,
        sds_dir=sds_dir,
        trust_domain=f["trust-domain"],
    )
    assert yaml.safe_load(data["bootstrap.yaml"]) == json.loads(
        envoy_config.bootstrap_json(expected)
    )
    written = envoy_config.write_ads_sds_files(str(tmp_path / "sds"), ads_tls)
    for path in written:
        name = Path(path).name
        assert json.loads(data[name]) == json.loads(Path(path).read_text()), name
    # The admin interface stays on loopback.
    assert (
        yaml.safe_load(data["bootstrap.yaml"])["admin"]["address"]["socket_address"]["address"]
        == "127.0.0.1"
    )


def test_envoy_accepts_the_rendered_bootstrap(tmp_path: Path) -> None:
    """``envoy --mode validate`` on the chart's bootstrap, its SDS files and real certificates
    (paths moved under tmp_path)."""
    from dkv.devstack import envoy_binary
    from dkv.security.certs import write_dev_pki

    envoy, _, data = envoy_paths(render({"trustDomain": "example.org"}))
    pki = tmp_path / "pki"
    write_dev_pki(pki, [("envoy", "envoy")], trust_domain="example.org")
    tls = tmp_path / "tls"
    tls.mkdir()
    shutil.copy(pki / "envoy.crt", tls / "tls.crt")
    shutil.copy(pki / "envoy.key", tls / "tls.key")
    shutil.copy(pki / "ca.crt", tls / "ca.crt")
    sds = tmp_path / "sds"
    sds.mkdir()
    for name in ("dkv_ads_cert.json", "dkv_ads_ca.json"):
        (sds / name).write_text(data[name].replace("/etc/dkv/tls/envoy", str(tls)))
    bootstrap = tmp_path / "bootstrap.yaml"
    bootstrap.write_text(data["bootstrap.yaml"].replace("/etc/envoy/sds", str(sds)))
    # The container's own arguments (the bootstrap's path moved), in validate mode.
    args = [str(bootstrap) if a == "/etc/envoy/bootstrap.yaml" else a for a in envoy["args"]]
    assert str(bootstrap) in args
    out = subprocess.run(
        [envoy_binary(), "--mode", "validate", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "configuration" in (out.stdout + out.stderr).lower()


def test_policy_configmap_is_the_default_policy_plus_the_test_client() -> None:
    from dkv.security.authz import DEFAULT_MODEL, DEFAULT_POLICY, Action, Authorizer, KeyRange

    assert (CHART / "files/auth/model.conf").read_text() == DEFAULT_MODEL, (
        "cp from authz.DEFAULT_MODEL"
    )
    assert (CHART / "files/auth/policy.csv").read_text() == DEFAULT_POLICY
    data = render({}).get("ConfigMap", f"{RELEASE}-auth")["data"]
    assert data["model.conf"] == DEFAULT_MODEL
    assert data["policy.csv"].startswith(DEFAULT_POLICY)
    authz = Authorizer.from_text(data["model.conf"], data["policy.csv"])
    from dkv.security.identity import Identity

    test_client = Identity.user("helm-test").subject
    assert authz.allowed(test_client, Action.WRITE, KeyRange.key(b"helm-test/front-door"))
    assert authz.allowed(test_client, Action.READ, KeyRange.key(b"helm-test/front-door"))
    assert not authz.allowed(test_client, Action.WRITE, KeyRange.key(b"app/x"))
    assert authz.allowed("user:admin", Action.ADMIN, KeyRange(b"", None))
    extra = render({"auth.extraPolicy": "g, user:alice, role:writer", "helmTest.enabled": False})
    policy = extra.get("ConfigMap", f"{RELEASE}-auth")["data"]["policy.csv"]
    assert "helm-test" not in policy and policy.rstrip().endswith("g, user:alice, role:writer")


def test_dashboards_are_the_repositorys_and_labelled_for_the_sidecar() -> None:
    boards = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
    assert boards
    for board in boards:
        copy = CHART / "files" / "dashboards" / board.name
        assert copy.read_text() == board.read_text(), f"cp {board} {copy}"
    maps = [m for m in render({}).of_kind("ConfigMap") if "-dashboard-" in m["metadata"]["name"]]
    assert len(maps) == len(boards)
    for m in maps:
        assert m["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((name, text),) = m["data"].items()
        assert json.loads(text) == json.loads((ROOT / "grafana" / "dashboards" / name).read_text())


def test_prometheus_rule_carries_the_repositorys_alerts() -> None:
    source = ROOT / "prometheus" / "rules.yaml"
    assert (CHART / "files/prometheus/rules.yaml").read_text() == source.read_text(), (
        "cp prometheus/rules.yaml charts/dkv/files/prometheus/rules.yaml"
    )
    rendered = render(
        {"metrics.prometheusRule.enabled": True, "metrics.serviceMonitor.enabled": True}
    )
    (rule,) = rendered.of_kind("PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(source.read_text())["groups"]
    # The alerts and dashboards select job="dkv-node" etc. (and "envoy"): the ServiceMonitors'
    # jobLabel gives that.
    texts = [source.read_text()]
    texts += [
        p.read_text().replace('\\"', '"') for p in (ROOT / "grafana/dashboards").glob("*.json")
    ]
    jobs = {j for t in texts for j in re.findall(r'job=~?"([^"$]+)"', t)}
    monitored = set()
    for monitor in rendered.of_kind("ServiceMonitor"):
        label = monitor["spec"]["jobLabel"]
        (svc,) = [
            s
            for s in rendered.of_kind("Service")
            if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]
        job = svc["metadata"]["labels"][label]
        assert any(re.fullmatch(j, job) for j in jobs), job
        monitored.add(job)
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {
            p["name"] for p in svc["spec"]["ports"]
        }
    assert monitored == {"dkv-membership", "dkv-node", "dkv-gateway", "envoy"}
    assert not render({}).of_kind("ServiceMonitor") and not render({}).of_kind("PrometheusRule")


def test_image_tag_is_the_project_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == version
    for w in render({}).workloads():
        for c in containers(w):
            assert c["image"] == f"dkv:{version}"
    for w in render({"image.tag": "dev"}).workloads():
        assert {c["image"] for c in containers(w)} == {"dkv:dev"}


def test_front_door_service_type_by_value() -> None:
    assert render({}).get("Service", RELEASE)["spec"]["type"] == "ClusterIP"
    svc = render({"frontDoor.service.type": "NodePort", "frontDoor.service.nodePort": 30379}).get(
        "Service", RELEASE
    )
    assert svc["spec"]["type"] == "NodePort" and svc["spec"]["ports"][0]["nodePort"] == 30379
    svc = render({"frontDoor.service.type": "LoadBalancer"}).get("Service", RELEASE)
    assert svc["spec"]["type"] == "LoadBalancer"


def test_existing_secrets_by_prefix() -> None:
    rendered = render({"tls.certManager.enabled": False, "tls.secretPrefix": "mine-"})
    assert not rendered.of_kind("Certificate") and not rendered.of_kind("Issuer")
    secrets = set(_secret_names(rendered))
    assert "mine-node-0-tls" in secrets and "mine-envoy-tls" in secrets
    assert all(s.startswith("mine-") for s in secrets)


def _secret_names(rendered: Rendered) -> Iterator[str]:
    for w in rendered.workloads():
        for v in pod_spec(w)["volumes"]:
            if "secret" in v:
                yield v["secret"]["secretName"]
            for s in v.get("projected", {}).get("sources", []):
                if "secret" in s:
                    yield s["secret"]["name"]


# -- values.schema.json and validateValues ------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"node.replicas": "three"}, "/node/replicas"),
        ({"node.replicas": 0}, "/node/replicas"),
        ({"bogus": 1}, "bogus"),
        ({"node.bogus": 1}, "bogus"),
        ({"tls.certManager.enabled": "yes"}, "enabled"),
        ({"frontDoor.service.type": "Ingress"}, "type"),
        ({"frontDoor.port": 70000}, "port"),
        ({"node.resources": {"requests": {"cpu": "lots"}}}, "cpu"),
        ({"membership.podAntiAffinity": "sometimes"}, "podAntiAffinity"),
        ({"logLevel": "loud"}, "logLevel"),
        ({"membership.replicas": 2}, "must be odd"),
        ({"node.replicas": 2}, "at least membership.replicationFactor"),
        ({"tls.secretPrefix": "mine-"}, "certManager.enabled=false"),
        ({"node.ports.metrics": 2379}, "three different ports"),
        ({"frontDoor.port": 2375}, "six different ports"),
        ({"gateway.envoy.statsPort": 2376}, "six different ports"),
        ({"tracing.sampleRatio": 1.5}, "sampleRatio"),
        ({"tracing.sampleRatio": "0.5"}, "sampleRatio"),
        ({"tracing.otlpEndpoint": "jaeger:4317"}, "otlpEndpoint"),
        ({"dev.liveUpdate.enabled": "yes"}, "enabled"),
        ({"dev.liveUpdate.dir": "/tmp"}, "dir"),
    ],
)
def test_bad_values_are_refused(values: dict[str, Any], says: str) -> None:
    from tests.chart.chart import render_error

    error = render_error(values)
    assert says in error, error


DKV_PROCESSES = ("dkv-node", "dkv-membership", "dkv-gateway")


def dkv_process_containers(rendered: Rendered) -> Iterator[tuple[str, dict[str, Any]]]:
    for w in rendered.workloads():
        if w["kind"] == "Pod":
            continue  # the helm test hook (dkvctl)
        for c in pod_spec(w)["containers"]:
            process = unwrap(c["command"])[0]
            if process in DKV_PROCESSES:
                yield process, c


def test_tracing_values_become_every_process_flags() -> None:
    from dkv_gateway.main import parse_args

    seen = set()
    for process, c in dkv_process_containers(render(DEV)):
        seen.add(process)
        assert flags(c)["otlp-endpoint"] == "http://jaeger:4317", process
        assert float(flags(c)["trace-sample-ratio"]) == 0.25, process
    assert seen == set(DKV_PROCESSES)
    for process, c in dkv_process_containers(render({})):
        assert not {"otlp-endpoint", "trace-sample-ratio"} & set(flags(c)), process
    # The rendered flag is what the gateway (which also configures Envoy's tracing) reads.
    cfg = parse_args(["--membership", "m:1", "--otlp-endpoint", "http://j:4317",
                      "--trace-sample-ratio", "0.25"])  # fmt: skip
    assert cfg.tracing is not None
    assert (cfg.tracing.otlp_endpoint, cfg.tracing.sample_ratio) == ("http://j:4317", 0.25)


def installed_packages() -> set[str]:
    """The top-level packages the wheel installs (pyproject's packages.find: src, services/*)."""
    out = {p.name for p in (ROOT / "src").iterdir() if (p / "__init__.py").is_file()}
    out |= {p.name for p in (ROOT / "services").glob("*/dkv_*") if (p / "__init__.py").is_file()}
    return out


def test_dev_live_update_gives_every_process_a_writable_shadowing_copy() -> None:
    """dev.liveUpdate (tilt/Tiltfile): every pod of the image seeds an emptyDir with a copy of
    every installed package, which is first on the dkv processes' PYTHONPATH, mounted in every
    container of the image (Tilt syncs into each), and the processes run under the restarter,
    whose trigger file lies in that volume."""
    from dkv.cli.devreload import _parser

    rendered = render(DEV)
    image = include_image(rendered)
    for w in rendered.workloads():
        if w["kind"] == "Pod":
            continue
        spec = pod_spec(w)
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes["dev-live-update"], w["metadata"]["name"]
        (init,) = spec["initContainers"]
        args = _parser().parse_args(init["command"][len(DEVRELOAD) :])
        assert args.what == "seed"
        assert set(args.packages) == installed_packages()
        for c in [init, *spec["containers"]]:
            assert c["image"] == image
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            mount = mounts.get("/var/run/dkv-dev")
            assert mount and mount["name"] == "dev-live-update", c["name"]
            assert not mount.get("readOnly"), c["name"]
        python_path = str(args.dest)
        assert python_path.startswith("/var/run/dkv-dev/")
        for c in spec["containers"]:
            if c["command"][: len(DEVRELOAD)] != DEVRELOAD:
                assert c["name"] == "envoy"
                continue
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["PYTHONPATH"].split(":")[0] == python_path
            run = _parser().parse_args(c["command"][len(DEVRELOAD) :])
            assert str(run.trigger).startswith("/var/run/dkv-dev/")
    for w in render({}).workloads():
        spec = pod_spec(w)
        assert "initContainers" not in spec
        assert all(v["name"] != "dev-live-update" for v in spec.get("volumes", []))
        for c in spec["containers"]:
            assert all(e["name"] != "PYTHONPATH" for e in c.get("env", []))
            assert c["command"][: len(DEVRELOAD)] != DEVRELOAD


def include_image(rendered: Rendered) -> str:
    """The one image every workload's containers run (the chart has one)."""
    images = {c["image"] for w in rendered.workloads() for c in containers(w)}
    assert len(images) == 1, images
    return images.pop()


def test_values_yaml_documents_and_satisfies_its_schema() -> None:
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(values, schema)
    text = (CHART / "values.yaml").read_text()
    for key in values:
        assert f"@param {key}" in text or f"\n{key}:" in text


def test_chart_version_is_semver_and_namespace_is_honoured() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    for o in render({}).objects:
        assert o["metadata"]["namespace"] == NAMESPACE, o["metadata"]["name"]


@pytest.mark.parametrize("scenario", sorted(p.name for p in (CHART / "ci").glob("*-values.yaml")))
def test_ci_scenarios_render_valid_objects(scenario: str) -> None:
    """charts/dkv/ci/*-values.yaml: the shapes users start from (a laptop, production)."""
    import kubernetes_validate

    out = run_helm(
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "-f",
        str(CHART / "ci" / scenario),
    )
    assert out.returncode == 0, out.stderr
    objects = [d for d in yaml.safe_load_all(out.stdout) if d]
    for obj in objects:
        if obj["apiVersion"] in BUILT_IN_GROUPS:
            for version in KUBERNETES_VERSIONS:
                kubernetes_validate.validate(obj, version, strict=True)
        else:
            validate_custom_resource(obj)


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({}, "port-forward service/dkv 2379:2379"),
        ({"frontDoor.service.type": "LoadBalancer"}, "WARNING: the front door is a LoadBalancer"),
        ({"membership.replicas": 1}, "WARNING: membership runs ONE replica"),
        ({"tls.certManager.enabled": False}, "made outside the chart"),
    ],
)
def test_notes_say_how_to_reach_the_front_door(values: dict[str, Any], says: str) -> None:
    from tests.chart.chart import set_args

    out = run_helm(
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--dry-run=client",
        *set_args(values),
    )
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    assert says in notes, notes
    assert "dkvctl --endpoints $DOOR put hello world" in notes
