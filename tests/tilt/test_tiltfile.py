"""tilt/Tiltfile (and the root Tiltfile that includes it), evaluated with starlark-pyo3 and
stubbed Tilt builtins (tests/tilt/tiltstub.py), against the chart really rendered with the same
arguments (Helm CLI of the chart tests): the image built is the image the chart runs, every
path exists, the live update lands in a writable directory first on the processes' PYTHONPATH
and restarts them, the port-forwards reach ports the pods serve, every resource is labelled,
and the dev-only manifests (Prometheus, Jaeger) are valid and fit the chart.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.chart import pod_spec
from tests.tilt.tiltstub import TiltRun, evaluate

ROOT = Path(__file__).resolve().parents[2]
TILT = ROOT / "tilt"
TILTFILE = TILT / "Tiltfile"
KUBERNETES_VERSIONS = ("1.35.0", "1.37.0")
WORKLOADS = ("Deployment", "StatefulSet")
DEVRELOAD = ["python", "-I", "-m", "dkv.cli.devreload"]


@functools.cache
def tilt_up(docker: bool = False) -> TiltRun:
    return evaluate(TILTFILE, docker=docker)


def repository(image: str) -> str:
    """The image's repository in the fully qualified form a kubelet resolves it to."""
    name = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    if "/" not in name:
        name = f"library/{name}"
    first = name.split("/", 1)[0]
    if "." not in first and ":" not in first and first != "localhost":
        name = f"docker.io/{name}"
    return name


def builds(run: TiltRun) -> dict[str, Any]:
    """Image ref -> the custom_build / docker_build call."""
    out = {}
    for call in run.named("custom_build") + run.named("docker_build"):
        out[call.args[0]] = call
    return out


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(obj)
    return [*spec.get("initContainers", []), *spec["containers"]]


def workloads(run: TiltRun) -> list[dict[str, Any]]:
    return [o for o in run.objects if o["kind"] in WORKLOADS]


def resources(run: TiltRun) -> dict[str, dict[str, Any]]:
    """k8s_resource calls by resource name (the workload's, or new_name)."""
    out = {}
    for call in run.named("k8s_resource"):
        name = call.kwargs.get("new_name") or (call.args[0] if call.args else "")
        out[name] = call.kwargs
    return out


def live_update(run: TiltRun) -> list[dict[str, Any]]:
    (call,) = [c for c in builds(run).values() if c.args[0] == "dkv"]
    return list(call.kwargs["live_update"])


# -- the image ----------------------------------------------------------------------------------


def test_root_tiltfile_includes_tilt_tiltfile() -> None:
    """`tilt up` from the repository root runs tilt/Tiltfile, with its paths resolved there."""
    root = evaluate(ROOT / "Tiltfile")
    assert root.calls[0].name == "include"
    assert [(c.name, c.args[:1]) for c in root.calls[1:]] == [
        (c.name, c.args[:1]) for c in tilt_up().calls
    ]
    assert root.objects == tilt_up().objects


@pytest.mark.parametrize("docker", [False, True], ids=["daemonless", "docker"])
def test_every_image_the_pods_run_is_one_the_tiltfile_builds(docker: bool) -> None:
    run = tilt_up(docker)
    built = {repository(ref): call for ref, call in builds(run).items()}
    assert {call.name for call in built.values()} == {"docker_build" if docker else "custom_build"}
    images = {c["image"] for o in workloads(run) for c in containers(o)}
    # The chart's image is the one dkv image, whatever its tag: Tilt matches by repository.
    chart_images = {c["image"] for o in run.chart_objects if o["kind"] in WORKLOADS
                    for c in containers(o)}  # fmt: skip
    assert len(chart_images) == 1
    assert repository(chart_images.pop()) == repository("dkv")
    for image in images:
        assert repository(image) in built, f"pods run {image}, which no build makes"


def test_the_daemonless_build_is_tilts_expected_ref_without_docker() -> None:
    run = tilt_up()
    for ref, call in builds(run).items():
        assert call.name == "custom_build"
        assert call.kwargs["skips_local_docker"] is True
        assert call.kwargs["disable_push"] is True
        script, what = call.args[1].split()
        path = call.cwd / script
        assert path.is_file() and path.stat().st_mode & 0o111, path
        assert what == {"dkv": "dkv", "dkv-devtools": "devtools"}[ref]
    text = (TILT / "build-image.sh").read_text()
    assert "EXPECTED_REF" in text and "DKV_IMAGE_REF" in text


def test_a_docker_daemon_is_asked_once_and_the_choice_can_be_forced() -> None:
    (probe,) = tilt_up().named("local")
    assert probe.args[0].startswith("docker info")
    forced = evaluate(TILTFILE, env={"DKV_TILT_BUILDER": "daemonless"})
    assert not forced.named("local") and forced.named("custom_build")
    forced = evaluate(TILTFILE, env={"DKV_TILT_BUILDER": "docker"})
    assert not forced.named("local") and forced.named("docker_build")
    with pytest.raises(Exception, match="DKV_TILT_BUILDER"):
        evaluate(TILTFILE, env={"DKV_TILT_BUILDER": "podman"})


@pytest.mark.parametrize("docker", [False, True], ids=["daemonless", "docker"])
def test_every_path_the_tiltfile_names_exists(docker: bool) -> None:
    run = tilt_up(docker)
    assert run.paths
    for path in run.paths:
        assert path.exists(), f"the Tiltfile names {path}, which does not exist"


# -- live update --------------------------------------------------------------------------------


def installed_packages() -> set[str]:
    out = {p.name for p in (ROOT / "src").iterdir() if (p / "__init__.py").is_file()}
    out |= {p.name for p in (ROOT / "services").glob("*/dkv_*") if (p / "__init__.py").is_file()}
    return out


def test_live_update_syncs_every_package_into_a_writable_dir_first_on_pythonpath() -> None:
    run = tilt_up()
    steps = live_update(run)
    syncs = [s for s in steps if s["step"] == "sync"]
    runs = [s for s in steps if s["step"] == "run"]
    assert steps[: len(syncs)] == syncs and runs, "syncs first, then the restart"
    # Every installed package, each from its source directory, to <dir>/<package>.
    targets = {}
    for s in syncs:
        local = Path(s["local"])
        assert (local / "__init__.py").is_file(), f"{local} is not a package"
        remote = Path(s["remote"])
        assert remote.name == local.name, f"{local} synced to {remote}"
        targets[remote.name] = remote.parent
    assert set(targets) == installed_packages()
    (live_dir,) = set(targets.values())

    pods = [o for o in run.chart_objects if o["kind"] in WORKLOADS]
    assert pods
    for o in pods:
        spec = pod_spec(o)
        volumes = {v["name"]: v for v in spec["volumes"]}
        (seed,) = spec["initContainers"]
        assert seed["command"][: len(DEVRELOAD)] == DEVRELOAD
        # The init container copies exactly the synced packages (whole, so the copy shadows).
        assert set(seed["command"][seed["command"].index("--dest") + 2 :]) == set(targets)
        assert seed["command"][seed["command"].index("--dest") + 1] == str(live_dir)
        for c in [seed, *spec["containers"]]:
            # Tilt syncs into every container of the image: each must have the directory
            # writable, on a volume (the root filesystem is read-only).
            mounts = [m for m in c["volumeMounts"] if live_dir.is_relative_to(m["mountPath"])]
            assert mounts, f"{o['metadata']['name']}/{c['name']}: {live_dir} is not mounted"
            (mount,) = mounts
            assert not mount.get("readOnly"), f"{c['name']}: {mount['mountPath']} is read-only"
            assert "emptyDir" in volumes[mount["name"]]
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
        for c in spec["containers"]:
            if c["command"][: len(DEVRELOAD)] != DEVRELOAD:
                assert c["command"] == ["envoy"]
                assert not any(e["name"] == "PYTHONPATH" for e in c.get("env", []))
                continue
            env = {e["name"]: e.get("value", "") for e in c["env"]}
            assert env["PYTHONPATH"].split(":")[0] == str(live_dir), c["name"]
            # The restarter's trigger is what the run step touches, on the same volume.
            trigger = c["command"][c["command"].index("--trigger") + 1]
            assert any(f"touch {trigger}" in r["cmd"] for r in runs), (trigger, runs)
            assert Path(trigger).is_relative_to(mounts[0]["mountPath"])


def test_the_restart_runs_only_where_the_dkv_processes_run() -> None:
    """The run step touches the trigger only in a container with PYTHONPATH (a dkv process),
    so a gateway pod (gateway + Envoy, both of the image) restarts its process once."""
    (step,) = [s for s in live_update(tilt_up()) if s["step"] == "run"]
    for env, touched in (({"PYTHONPATH": "/var/run/dkv-dev/python"}, True), ({}, False)):
        out = subprocess.run(
            ["sh", "-c", step["cmd"].replace("touch ", "echo TOUCH ")],
            env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert ("TOUCH" in out.stdout) is touched


def test_a_live_update_to_a_missing_path_is_caught() -> None:
    """The checks can fail: a Tiltfile syncing a directory that does not exist."""
    source = TILTFILE.read_text().replace("'../src/dkv'", "'../src/dkv-missing'")
    run = evaluate(TILTFILE, source=source)
    missing = [p for p in run.paths if not p.exists()]
    assert missing == [ROOT / "src" / "dkv-missing"]


# -- port-forwards, labels, objects -----------------------------------------------------------


def served_container_ports(obj: dict[str, Any]) -> dict[int, str]:
    """containerPort -> container name, for the ports the pod's processes listen on, from
    their own flags and configs (a port declared but not served is not counted)."""
    out = {}
    for c in pod_spec(obj)["containers"]:
        declared = {p["containerPort"] for p in c.get("ports", [])}
        text = " ".join(c.get("command", []) + c.get("args", []))
        for port in declared:
            if re.search(rf"(0\.0\.0\.0:|--envoy-port=){port}\b", text):
                out[port] = c["name"]
        if c["name"] == "envoy":
            out.update({p: "envoy" for p in declared if p != 2376})
        if c["name"] in ("prometheus", "jaeger"):
            out.update({p: c["name"] for p in declared})
    return out


def test_port_forwards_reach_ports_the_pods_serve() -> None:
    run = tilt_up()
    by_name = {o["metadata"]["name"]: o for o in workloads(run)}
    forwards = {}
    for name, kwargs in resources(run).items():
        for pf in kwargs.get("port_forwards", []):
            assert name in by_name, f"port-forward on {name}, which is no workload"
            served = served_container_ports(by_name[name])
            assert pf["container"] in served, f"{name}: nothing serves {pf['container']}"
            assert pf["local"] not in forwards, f"local port {pf['local']} forwarded twice"
            forwards[pf["local"]] = (name, pf["container"])
    # The front door (Envoy), Prometheus and the trace UI (Jaeger's query port).
    front_door = next(o for o in run.objects if o["kind"] == "Service"
                      and o["metadata"]["name"] == "dkv")  # fmt: skip
    assert ("dkv-gateway", front_door["spec"]["ports"][0]["port"]) in forwards.values()
    jaeger = yaml.safe_load(configmap(run, "jaeger")["config.yaml"])
    query_port = int(jaeger["extensions"]["jaeger_query"]["http"]["endpoint"].split(":")[-1])
    assert ("jaeger", query_port) in forwards.values()
    prometheus = by_name["prometheus"]
    listen = next(a for a in pod_spec(prometheus)["containers"][0]["args"]
                  if a.startswith("--web.listen-address="))  # fmt: skip
    assert ("prometheus", int(listen.rsplit(":", 1)[1])) in forwards.values()


def test_every_resource_is_labelled_and_every_object_has_a_resource() -> None:
    run = tilt_up()
    res = resources(run)
    label = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")
    for o in workloads(run):
        name = o["metadata"]["name"]
        assert name in res, f"workload {name} has no k8s_resource"
    for name, kwargs in res.items():
        labels = kwargs.get("labels")
        assert labels, f"resource {name} has no labels"
        assert all(label.match(x) for x in labels), labels
    # Objects named by resources: each selector (Tilt's name:kind, full match, any case)
    # matches exactly one object; what is neither a workload nor a Service (which Tilt
    # attaches to the workload whose pods it selects) is in some resource.
    claimed: dict[str, str] = {}
    for name, kwargs in res.items():
        for selector in kwargs.get("objects", []):
            obj_name, kind = selector.split(":")[:2]
            matches = [
                o for o in run.objects
                if re.fullmatch(obj_name, o["metadata"]["name"], re.I)
                and re.fullmatch(kind, o["kind"], re.I)
            ]  # fmt: skip
            assert len(matches) == 1, f"{selector} matches {len(matches)} objects"
            key = f"{matches[0]['kind']}/{matches[0]['metadata']['name']}"
            assert key not in claimed, f"{key} is in {claimed[key]} and {name}"
            claimed[key] = name
    for o in run.objects:
        if o["kind"] in (*WORKLOADS, "Service"):
            continue
        key = f"{o['kind']}/{o['metadata']['name']}"
        assert key in claimed, f"{key} is in no resource"
    for o in run.objects:
        if o["kind"] == "Service":
            selector = o["spec"]["selector"].items()
            assert any(selector <= pod_spec_labels(w).items() for w in workloads(run)), o


def pod_spec_labels(obj: dict[str, Any]) -> dict[str, str]:
    return dict(obj["spec"]["template"]["metadata"]["labels"])


def configmap(run: TiltRun, name: str) -> dict[str, str]:
    (cm,) = [o for o in run.objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name]
    return dict(cm["data"])


# -- Prometheus and Jaeger -----------------------------------------------------------------------


def devtools_objects(run: TiltRun) -> list[dict[str, Any]]:
    chart = {(o["kind"], o["metadata"]["name"]) for o in run.chart_objects}
    return [o for o in run.objects if (o["kind"], o["metadata"]["name"]) not in chart]


def test_devtools_manifests_are_valid_and_in_the_namespace() -> None:
    import kubernetes_validate

    run = tilt_up()
    objects = devtools_objects(run)
    assert {(o["kind"], o["metadata"]["name"]) for o in objects} >= {
        ("Deployment", "prometheus"), ("Service", "prometheus"), ("Deployment", "jaeger"),
        ("Service", "jaeger"), ("ConfigMap", "prometheus-rules"), ("Namespace", "dkv"),
    }  # fmt: skip
    for o in objects:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(o, version, strict=True)
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == "dkv", o["metadata"]["name"]
        if o["kind"] == "Deployment":
            spec = pod_spec(o)
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert spec["automountServiceAccountToken"] is False  # no API access needed
            for c in spec["containers"]:
                assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_prometheus_config_passes_promtool_and_scrapes_every_process(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("no promtool (apt-get install prometheus)")
    run = tilt_up()
    config = yaml.safe_load(configmap(run, "prometheus")["prometheus.yml"])
    # The rule file where the pod mounts it, here under tmp_path.
    rules = tmp_path / "rules.yaml"
    rules.write_text(configmap(run, "prometheus-rules")["rules.yaml"])
    assert rules.read_text() == (ROOT / "prometheus" / "rules.yaml").read_text()
    deployment = next(o for o in workloads(run) if o["metadata"]["name"] == "prometheus")
    container = pod_spec(deployment)["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert config["rule_files"] == [f"{mounts['rules']}/rules.yaml"]
    config["rule_files"] = [str(rules)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([promtool, "check", "config", str(path)], capture_output=True,
                         text=True, check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr

    # Every job scrapes, through a Service of the chart, the port each selected pod serves its
    # metrics on; a ClusterIP (one address) only where one pod runs; and the jobs are the
    # chart's (its metrics Services' dkv.dev/job labels).
    services = {o["metadata"]["name"]: o for o in run.chart_objects if o["kind"] == "Service"}
    pods = [o for o in run.chart_objects if o["kind"] in WORKLOADS]
    jobs = {}
    for job in config["scrape_configs"]:
        (sd,) = job["dns_sd_configs"]
        (name,) = sd["names"]
        svc = services[name]
        selected = [w for w in pods
                    if svc["spec"]["selector"].items() <= pod_spec_labels(w).items()]  # fmt: skip
        (workload,) = selected
        if svc["spec"].get("clusterIP") != "None":
            assert workload["spec"]["replicas"] == 1, f"{name} is a ClusterIP of several pods"
        ports = {p["containerPort"]: p["name"] for c in pod_spec(workload)["containers"]
                 for p in c.get("ports", [])}  # fmt: skip
        assert ports.get(sd["port"]) in ("metrics", "envoy-metrics"), (name, sd["port"])
        jobs[job["job_name"]] = job.get("metrics_path", "/metrics")
    labelled = {s["metadata"]["labels"]["dkv.dev/job"] for s in services.values()
                if "dkv.dev/job" in s["metadata"]["labels"]}  # fmt: skip
    assert set(jobs) == labelled
    assert jobs == {"dkv-node": "/metrics", "dkv-membership": "/metrics",
                    "dkv-gateway": "/metrics", "envoy": "/stats/prometheus"}  # fmt: skip


def test_traces_go_to_the_jaeger_the_tiltfile_deploys() -> None:
    run = tilt_up()
    endpoints = set()
    for o in run.chart_objects:
        if o["kind"] not in WORKLOADS:
            continue
        for c in pod_spec(o)["containers"]:
            for arg in c.get("args", []):
                if arg.startswith("--otlp-endpoint="):
                    endpoints.add(arg.split("=", 1)[1])
    (endpoint,) = endpoints
    host, port = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", endpoint).groups()  # type: ignore[union-attr]
    (svc,) = [o for o in run.objects if o["kind"] == "Service" and o["metadata"]["name"] == host]
    (svc_port,) = [p for p in svc["spec"]["ports"] if p["port"] == int(port)]
    jaeger = next(o for o in workloads(run) if o["metadata"]["name"] == "jaeger")
    (container,) = pod_spec(jaeger)["containers"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = yaml.safe_load(configmap(run, "jaeger")["config.yaml"])
    otlp = config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert otlp == f"0.0.0.0:{named[svc_port['targetPort']]}"
    assert "otlp" in config["service"]["pipelines"]["traces"]["receivers"]
    assert json.dumps(config).count("0.0.0.0") >= 2  # OTLP and the query API reach the pod IP
