"""The Grafana dashboards in grafana/dashboards/: up to date with their generator, loadable, and
every panel's every query answers on a real Prometheus scraping a real local stack.

The stack is ``make run``'s (:class:`dkv.devstack.DevStack`) with its Prometheus on (the same
:mod:`dkv.prometheus_config` generator, scraping every second): membership, three nodes, the
gateway and Envoy, driven through the front door by a short workload (puts, gets, ranges over
every shard, a watch). Then each query must return a non-empty vector ("shards without a
leader" returning 0 is data; an empty result means a misspelt metric, label or selector), every
metric a query names must be among the names Prometheus scraped, and every ``{{label}}`` a
legend shows must be on the series it labels. The alert rules (prometheus/rules.yaml, loaded by
the same Prometheus) must evaluate without error and name only scraped metrics. Cardinality is
bounded: every label on a dkv series is one of a known set, with few values, and none holds a
key, a client address or a method name a client made up.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import grpc.aio
import pytest
import yaml

from dkv import prometheus_config
from dkv.client import Client
from dkv.devstack import DevLayout, DevStack, StackError
from dkv.v1 import kv_pb2

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "grafana" / "dashboards.py"
DASHBOARD_DIR = ROOT / "grafana" / "dashboards"
RULES = ROOT / "prometheus" / "rules.yaml"

# What Grafana would put in place of its built-in variables. The rate window spans several
# 1 s scrapes, so a counter scraped twice since it appeared has a rate.
BUILTINS = {"__rate_interval": "10s", "__interval": "5s", "__range": "5m"}
SCRAPE_INTERVAL_S = 1.0
QUERY_DEADLINE_S = 45.0


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dkv_grafana_dashboards", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def _dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


# -- what a dashboard asks ------------------------------------------------------------------------


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str  # file name
    panel: str  # title
    ref: str  # refId
    expr: str  # as in the file, with $variables
    legend: str

    def where(self) -> str:
        return f"{self.dashboard}, panel {self.panel!r}, query {self.ref}"


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for p in panels:
        if p.get("type") == "row":
            yield from _panels(p.get("panels") or [])
        else:
            yield p


def panel_queries(name: str, board: dict[str, Any]) -> list[PanelQuery]:
    return [
        PanelQuery(name, p["title"], t["refId"], t["expr"], t.get("legendFormat", ""))
        for p in _panels(board["panels"])
        for t in p.get("targets", [])
    ]


def variable_assignments(board: dict[str, Any]) -> list[tuple[dict[str, str], bool]]:
    """(values of the dashboard's own variables, is it the default?): the defaults first, then
    each other value of each custom variable, one at a time."""
    custom = [v for v in board["templating"]["list"] if v["type"] == "custom"]
    default = {v["name"]: v["current"]["value"] for v in custom}
    out = [(default, True)]
    for v in custom:
        for value in (x.strip() for x in v["query"].split(",")):
            if value != default[v["name"]]:
                out.append(({**default, v["name"]: value}, False))
    return out


def expand(expr: str, values: dict[str, str]) -> str:
    """``expr`` with Grafana's variables replaced (``$name`` and ``${name}``); raises on one
    this test does not know."""
    known = {**BUILTINS, **values}

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in known:
            raise KeyError(f"unknown variable ${name} in {expr!r}")
        return known[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, expr)


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, aggregations, keywords, label
    names and durations left out)."""
    s = _STRING.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery windows
    s = _GROUPING.sub(" ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        before = s[m.start() - 1] if m.start() else " "
        if before.isdigit() or before == ".":
            continue  # 1e3, 0.5m
        if s[m.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if m.group().lower() in _KEYWORDS:
            continue
        names.add(m.group())
    return names


def label_names(expr: str) -> set[str]:
    """Label names a PromQL expression groups by or matches on."""
    s = _STRING.sub('""', expr)
    out = {x.strip() for g in _GROUPING.findall(s) for x in g.split(",") if x.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", s):
        out |= set(_MATCHER_LABEL.findall(matchers))
    return out - {"__name__"}


def legend_labels(legend: str) -> set[str]:
    return set(re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", legend))


# -- fast checks: the files themselves ----------------------------------------------------------


def test_dashboards_are_fresh() -> None:
    rendered: dict[str, str] = _generator().render()
    committed = {p.name: p.read_text() for p in DASHBOARD_DIR.glob("*.json")}
    missing = sorted(rendered.keys() - committed.keys())
    extra = sorted(committed.keys() - rendered.keys())
    stale = sorted(n for n in rendered.keys() & committed.keys() if rendered[n] != committed[n])
    assert not (missing or extra or stale), (
        f"grafana/dashboards/ is not what grafana/dashboards.py makes (missing {missing}, "
        f"left over {extra}, stale {stale}): run `make dashboards` and commit the JSON"
    )


def test_dashboards_are_loadable_by_grafana() -> None:
    boards = _dashboards()
    assert len(boards) == 4, sorted(boards)
    uids = [b.get("uid") for b in boards.values()]
    assert len(set(uids)) == len(uids) and all(uids), uids
    for name, board in boards.items():
        assert board.get("title") and isinstance(board.get("schemaVersion"), int), name
        assert [a.get("builtIn") for a in board["annotations"]["list"]] == [1], name
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource", name
        assert variables["datasource"]["query"] == "prometheus", name
        ids = [p["id"] for p in board["panels"]]
        assert len(set(ids)) == len(ids), f"{name}: panel ids repeat: {ids}"
        queries = panel_queries(name, board)
        assert queries, name
        for panel in _panels(board["panels"]):
            title = f"{name}, panel {panel.get('title')!r}"
            pos = panel["gridPos"]
            assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24, title
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
            assert panel["targets"], f"{title} has no query"
            refs = [t["refId"] for t in panel["targets"]]
            assert all(refs) and len(set(refs)) == len(refs), f"{title}: refIds {refs}"
            assert all(t["expr"].strip() for t in panel["targets"]), title
        for q in queries:
            expand(q.expr, variable_assignments(board)[0][0])  # no unknown variable
            assert metric_names(q.expr), f"{q.where()} names no metric: {q.expr}"


def test_query_parsing_helpers() -> None:
    """The checks below are only as good as these: a name they miss is never checked."""
    expr = (
        "histogram_quantile(0.99, sum by (le, instance) (rate(dkv_disk_batch_entries_bucket"
        '{job=~"a|b", x!="y"}[$__rate_interval]))) / on (instance) group_left '
        "sum(up offset 5m) or vector(0)"
    )
    assert metric_names(expr) == {"dkv_disk_batch_entries_bucket", "up"}
    assert label_names(expr) == {"le", "instance", "job", "x"}
    assert metric_names('max(a) - min by (shard) (b{c="d{e}"}) > 1e3') == {"a", "b"}
    assert legend_labels("p99 {{grpc_method}} {{ instance }}") == {"grpc_method", "instance"}
    assert expand('rate(x[$__rate_interval]) + y{job="${job}"}', {"job": "j"}) == (
        'rate(x[10s]) + y{job="j"}'
    )
    with pytest.raises(KeyError, match=r"\$nope"):
        expand("x[$nope]", {})


def test_cardinality_check_catches_keys_addresses_methods_and_new_labels() -> None:
    """The check the real-Prometheus test applies to every dkv series is not vacuous."""

    class Fake(Prometheus):
        def __init__(self, series: list[dict[str, str]]) -> None:
            self.series = series

        def get(self, path: str, **params: str) -> Any:
            assert path == "/api/v1/series" and params == {"match[]": '{job=~"dkv-.*"}'}
            return {"status": "success", "data": self.series}

    base = {"__name__": "dkv_node_keys", "job": "dkv-node", "instance": "127.0.0.1:2411"}
    fine = [{**base, "shard": str(s)} for s in range(1, 5)]
    assert _cardinality_problems(Fake(fine), [b"dash/001"]) == []
    cases = {
        "label 'key' is not a bounded one": {**base, "key": "x"},
        "label 'reason' holds a key: 'dash/001'": {**base, "reason": "dash/001"},
        "label 'peer' is not a bounded one": {**base, "peer": "127.0.0.1:50312"},
        "label 'to' holds an address: '127.0.0.1:50312'": {**base, "to": "127.0.0.1:50312"},
        "a client's method name became a grpc_method value": {
            **base,
            "grpc_method": UNKNOWN_METHOD.rpartition("/")[2],
        },
    }
    for expected, bad in cases.items():
        problems = _cardinality_problems(Fake([*fine, bad]), [b"dash/001"])
        assert any(p.startswith(expected) for p in problems), (expected, problems)
    many = [{**base, "shard": str(s)} for s in range(MAX_LABEL_VALUES + 1)]
    assert _cardinality_problems(Fake(many), []) == [
        f"label 'shard' has {MAX_LABEL_VALUES + 1} values (more than {MAX_LABEL_VALUES})"
    ]


# -- make run's Prometheus, without starting anything ---------------------------------------------


def test_make_run_prometheus_config_is_valid(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: `apt-get install prometheus`")
    layout = DevLayout(tmp_path, port_base=12000, prometheus=True)
    path = DevStack(layout).write_prometheus_config()
    out = subprocess.run(
        [promtool, "check", "config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 1 rule files found" in out.stdout + out.stderr  # prometheus/rules.yaml
    config = json.loads(path.read_text())
    jobs = {c["job_name"]: c for c in config["scrape_configs"]}
    assert set(jobs) == {"dkv-membership", "dkv-node", "dkv-gateway", "envoy"}
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    assert jobs["envoy"]["static_configs"] == [{"targets": ["127.0.0.1:12006"]}]
    assert len(jobs["dkv-node"]["static_configs"][0]["targets"]) == 3
    assert config["rule_files"] == [str(RULES)]


def test_make_run_starts_prometheus_only_when_wanted_and_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prometheus_config, "binary", lambda: "/usr/bin/prometheus")
    on = DevLayout(tmp_path, port_base=12000, prometheus=True)
    stack = DevStack(on)
    proc = stack.plan()[-1]
    assert proc.name == "prometheus"
    assert "--web.listen-address=127.0.0.1:12060" in proc.argv
    assert f"--storage.tsdb.path={tmp_path / 'prometheus'}" in proc.argv
    assert proc.log_path == tmp_path / "logs" / "prometheus.log"
    assert (12060, "Prometheus") in on.ports()
    assert len({port for port, _ in on.ports()}) == len(on.ports()), "two uses of one port"
    banner = stack.banner()
    assert "http://127.0.0.1:12060" in banner and prometheus_config.EXAMPLE_QUERY in banner

    monkeypatch.setattr(prometheus_config, "binary", lambda: None)
    assert all(p.name != "prometheus" for p in stack.plan())
    assert all(what != "Prometheus" for _, what in on.ports())  # its port need not be free
    assert "not installed: apt-get install prometheus" in stack.banner()

    for off in (
        DevLayout(tmp_path, port_base=12000),  # the tests' default
        DevLayout(tmp_path, port_base=12000, prometheus=True, metrics=False),
    ):
        assert all(p.name != "prometheus" for p in DevStack(off).plan())
        assert "Prometheus" not in DevStack(off).banner()
        assert all(what != "Prometheus" for _, what in off.ports())


# -- the real thing: Prometheus scraping a local stack ------------------------------------------

# Broken on purpose, checked beside the dashboards' queries: the checks must report them.
CANARIES = [
    PanelQuery(
        "canary.json",
        "misspelt metric",
        "A",
        'sum(rate(dkv_raft_proposals_comitted_total{job="dkv-node"}[$__rate_interval]))',
        "",
    ),
    PanelQuery(
        "canary.json",
        "legend label",
        "A",
        'max by (shard) (dkv_raft_term{job="dkv-node"})',
        "{{instanse}}",
    ),
]


def _free_layout(root: Path) -> DevLayout:
    """A port base whose ports are all free (below the ephemeral range, where other tests'
    port-0 servers live), with Prometheus on and scraping every second."""
    rng = random.Random()
    for _ in range(50):
        layout = DevLayout(
            root,
            port_base=rng.randrange(10_000, 30_000, 200),
            shards=4,
            prometheus=True,
            prometheus_scrape_interval_s=SCRAPE_INTERVAL_S,
        )
        try:
            DevStack(layout).check_ports()
        except StackError:
            continue
        return layout
    raise AssertionError("no free port range found")


class Prometheus:
    """The HTTP API of the stack's Prometheus."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return json.loads(exc.read())  # 400/422: {"status": "error", "error": ...}

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def query(self, expr: str) -> tuple[list[dict[str, Any]] | None, str]:
        """(the instant vector, "") or (None, the error)."""
        body = self.get("/api/v1/query", query=expr)
        if body.get("status") != "success":
            return None, f"{body.get('errorType')}: {body.get('error')}"
        data = body["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}], ""
        return data["result"], ""


def _poll(
    what: Callable[[], str], check: Callable[[], Any], deadline_s: float, interval_s: float = 0.5
) -> Any:
    """``check()`` until it returns something truthy; fails with ``what()`` at the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what()} within {deadline_s:g} s")
        time.sleep(interval_s)


async def _workload(layout: DevLayout) -> list[bytes]:
    """Enough through the front door that every panel has a series with a rate: writes and
    reads on every shard, ranges (fan-out), a prefix watch over every shard, a delete."""
    door = [f"127.0.0.1:{layout.front_door}"]
    keys = [b"dash/%03d" % i for i in range(40)]
    async with Client(door, layout.client_tls_files(), timeout_s=10) as c:
        for k in keys:
            await c.put(k, b"v" * 64)
            await c.get(k)
        page = await c.range(kv_pb2.RangeRequest(prefix=b"dash/"))
        assert len(page.kvs) == len(keys)
        await c.range(kv_pb2.RangeRequest(prefix=b"dash/", count_only=True))
        watch = c.watch(kv_pb2.WatchRequest(prefix=b"dash/", start_revision=1))
        seen: set[bytes] = set()
        try:
            while len(seen) < len(keys):
                resp = await asyncio.wait_for(anext(watch), 30)
                seen |= {e.kv.key for e in resp.events}
        finally:
            await watch.aclose()  # type: ignore[attr-defined]
        await c.delete(keys[0])
    return keys


# Cardinality (issue 10: no key, request id or client address in a label): every label a dkv
# process puts on a series is one of these, each with a bounded set of values.
BOUNDED_LABELS = {
    "__name__", "job", "instance", "le",  # Prometheus's own; histogram buckets
    "grpc_type", "grpc_service", "grpc_method", "grpc_code",  # go-grpc-prometheus's
    "shard", "to",  # a shard id, a peer's node id
    "reason", "kind", "state", "health", "result",  # fixed enumerations
    "generation", "implementation", "major", "minor", "patchlevel", "version",  # python_*
}  # fmt: skip
MAX_LABEL_VALUES = 64  # per label across the stack, names and buckets aside (4 shards here)
UNKNOWN_METHOD = "/dkv.v1.KV/NoSuchMethod"
ADDRESS = re.compile(r"\d+\.\d+\.\d+\.\d+:\d+|\[[0-9a-f:]+\]:\d+")


async def _call_unknown_method(layout: DevLayout) -> None:
    """A method name no server has, at the gateway and at a node: a client chooses it, so it
    must not become a label value (gRPC answers UNIMPLEMENTED before any handler runs)."""
    tls = layout.client_tls_files()
    assert tls is not None
    creds = grpc.ssl_channel_credentials(
        *(Path(p).read_bytes() for p in (tls.trusted_ca_file, tls.key_file, tls.cert_file))
    )
    for port in (layout.gateway, layout.node_client(1)):
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as ch:
            call: Any = ch.unary_unary(UNKNOWN_METHOD)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(b"", timeout=5)
            assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED, err.value


def _cardinality_problems(prom: Prometheus, keys: list[bytes]) -> list[str]:
    """What in the dkv processes' series is not bounded: an unexpected label, a label with
    too many values, a key, a client address or a client's method name as a value."""
    series = prom.get("/api/v1/series", **{"match[]": '{job=~"dkv-.*"}'})["data"]
    assert series, "no series of the dkv jobs"
    values: dict[str, set[str]] = {}
    for labels in series:
        for name, value in labels.items():
            values.setdefault(name, set()).add(value)
    problems = [
        f"label {name!r} is not a bounded one (values such as {sorted(values[name])[:5]})"
        for name in sorted(values.keys() - BOUNDED_LABELS)
    ]
    problems += [
        f"label {name!r} has {len(vs)} values (more than {MAX_LABEL_VALUES})"
        for name, vs in sorted(values.items())
        if name not in ("__name__", "le") and len(vs) > MAX_LABEL_VALUES
    ]
    texts = [k.decode() for k in keys]
    for name, vs in sorted(values.items()):
        for value in sorted(vs):
            if any(t in value for t in texts):
                problems.append(f"label {name!r} holds a key: {value!r}")
            if name != "instance" and ADDRESS.search(value):
                problems.append(f"label {name!r} holds an address: {value!r}")
    if UNKNOWN_METHOD.rpartition("/")[2] in values.get("grpc_method", set()):
        problems.append(f"a client's method name became a grpc_method value ({UNKNOWN_METHOD})")
    return problems


def _check_queries(
    prom: Prometheus, queries: list[tuple[PanelQuery, dict[str, str], bool]]
) -> list[str]:
    """What is wrong with each query now: an error, or (with the default variable values) an
    empty result or a series without a label its legend shows."""
    problems = []
    for q, values, default in queries:
        expr = expand(q.expr, values)
        result, error = prom.query(expr)
        shown = f"{q.where()} with {values}" if values else q.where()
        if result is None:
            problems.append(f"{shown}: Prometheus refused it ({error}): {expr}")
        elif default and not result:
            problems.append(f"{shown}: returned no data: {expr}")
        elif default:
            for series in result:
                lacking = legend_labels(q.legend) - series["metric"].keys()
                if lacking:
                    problems.append(
                        f"{shown}: legend {q.legend!r} shows {sorted(lacking)}, which the "
                        f"series {series['metric']} lacks: {expr}"
                    )
                    break
    return problems


@pytest.mark.slow
def test_every_panel_query_returns_data_from_a_real_prometheus(tmp_path: Path) -> None:
    if prometheus_config.binary() is None or shutil.which("promtool") is None:
        pytest.fail(
            "prometheus is not installed: `apt-get install prometheus` (Debian's package; "
            "CI's .ci/run installs it). This test runs every dashboard query on a real one."
        )
    layout = _free_layout(tmp_path / ".dkv")
    stack = DevStack(layout)
    assert stack.prometheus_binary() is not None
    boards = _dashboards()
    queries = [
        (q, values, default)
        for name, board in boards.items()
        for values, default in variable_assignments(board)
        for q in panel_queries(name, board)
    ]
    started = time.monotonic()
    stack.start()
    try:
        asyncio.run(stack.wait_ready())
        prom = Prometheus(layout.prometheus_port)
        _poll(lambda: "Prometheus was not ready", prom.ready, 30)

        # It scrapes exactly what make run's configuration names, and all of it answers.
        expected = sorted(
            (t.job, t.address)
            for t in prometheus_config.targets(layout.metrics_targets(), layout.envoy_admin)
        )

        seen: list[tuple[str, str, str]] = []

        def targets_up() -> bool:
            active = prom.get("/api/v1/targets", state="active")["data"]["activeTargets"]
            seen[:] = sorted(
                (t["labels"]["job"], t["labels"]["instance"], t["health"]) for t in active
            )
            return [(job, at) for job, at, _ in seen] == expected and all(
                health == "up" for _, _, health in seen
            )

        _poll(lambda: f"Prometheus did not scrape {expected} (last: {seen})", targets_up, 30)
        keys = asyncio.run(_workload(layout))
        asyncio.run(_call_unknown_method(layout))

        # Rates need two scrapes after a series appears: poll until every query has data
        # (or the deadline: then the problems left are the answer).
        checked = queries + [(q, {}, True) for q in CANARIES]
        deadline = time.monotonic() + QUERY_DEADLINE_S
        while True:
            problems = _check_queries(prom, checked)
            if all(p.startswith("canary.json") for p in problems):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(SCRAPE_INTERVAL_S)
        scraped = set(prom.get("/api/v1/label/__name__/values")["data"])
        labels = set(prom.get("/api/v1/labels")["data"])
        for q, _, default in checked:
            if not default:
                continue
            problems += [
                f"{q.where()}: metric {m!r} is not among what Prometheus scraped "
                "(misspelt, or no process exports it)"
                for m in sorted(metric_names(q.expr) - scraped)
            ]
            problems += [
                f"{q.where()}: label {label!r} is on no scraped series (misspelt?)"
                for label in sorted(label_names(q.expr) - labels)
            ]
        caught = [p for p in problems if p.startswith("canary.json")]
        assert len(caught) == 3, f"the checks missed a broken query: {caught}"
        assert "'misspelt metric', query A: returned no data" in caught[0], caught
        assert "legend '{{instanse}}' shows ['instanse']" in caught[1], caught
        assert "metric 'dkv_raft_proposals_comitted_total' is not among" in caught[2], caught
        problems = [p for p in problems if p not in caught]
        assert not problems, "\n".join(problems)

        # Every label of every dkv series is bounded; the workload's keys are in none.
        unbounded = _cardinality_problems(prom, [*keys, b"dkv-dev/ready"])
        assert not unbounded, "\n".join(unbounded)

        # The alert rules: loaded from prometheus/rules.yaml, evaluated without error, naming
        # only scraped metrics.
        rule_exprs = [
            r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
        ]
        missing = {
            f"{expr.strip()!r}: {m}" for expr in rule_exprs for m in metric_names(expr) - scraped
        }
        assert not missing, f"alert rules name metrics nobody exports: {sorted(missing)}"

        def rules_evaluated() -> list[dict[str, Any]]:
            groups = prom.get("/api/v1/rules")["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            if len(rules) != len(rule_exprs):
                return []
            if any(r["lastEvaluation"].startswith("0001-") for r in rules):
                return []  # not evaluated yet
            return rules

        rules = _poll(lambda: "the alert rules were not all evaluated", rules_evaluated, 20)
        failing = [f"{r['name']}: {r.get('lastError')}" for r in rules if r["health"] != "ok"]
        assert not failing, f"alert rules fail to evaluate: {failing}"
    finally:
        stack.stop()
    assert all(p.exited() is not None for p in stack.procs)
    print(f"{len(queries)} queries checked in {time.monotonic() - started:.1f} s")
