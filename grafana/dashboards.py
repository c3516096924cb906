"""dkv's Grafana dashboards as code: ``make dashboards`` writes ``grafana/dashboards/*.json``.

Built with Grafana's own typed builders (PyPI ``grafana-foundation-sdk``, Apache-2.0; Grafana
itself is AGPL and is never built or vendored here). The JSON files are committed, so the Helm
chart (and anyone importing them into a Grafana by hand) needs no Python;
``tests/telemetry/test_dashboards.py`` fails when they are stale, and runs every panel's query
against a real Prometheus scraping a real local stack (``dkv.prometheus_config``, the same
configuration ``make run`` gives its Prometheus).

Conventions, as etcd-mixin's dashboards:

- a ``datasource`` template variable (type prometheus) that every panel uses, so the files
  import into any Grafana without editing;
- counters are shown as ``rate(...[$__rate_interval])``; quantiles as
  ``histogram_quantile(q, sum by (le, ...) (rate(..._bucket[$__rate_interval])))``;
- jobs as ``dkv.prometheus_config`` and the chart name them: ``dkv-node``, ``dkv-membership``,
  ``dkv-gateway``, ``envoy``; ``instance`` tells the processes of a job apart;
- membership's replicas each export their whole view of the cluster: take ``max`` across them.

Usage: ``python grafana/dashboards.py [--out DIR]`` (default: ``dashboards/`` beside this file);
``--check`` only reports whether the files there are up to date (exit 1 if not).
"""

from __future__ import annotations

import argparse
import string
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders.common import ReduceDataOptions, StackingConfig
from grafana_foundation_sdk.builders.dashboard import (
    AnnotationQuery,
    CustomVariable,
    Dashboard,
    DashboardLink,
    DatasourceVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.builders.heatmap import HeatmapColorOptions, YAxisConfig
from grafana_foundation_sdk.builders.heatmap import Panel as HeatmapPanel
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.stat import Panel as StatPanel
from grafana_foundation_sdk.builders.timeseries import Panel as TimeseriesPanel
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.common import BigValueGraphMode, StackingMode, VisibilityMode
from grafana_foundation_sdk.models.heatmap import HeatmapColorMode, HeatmapColorScale
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
TAG = "dkv"
FRONT_DOOR_KV = 'job="dkv-gateway", grpc_service="dkv.v1.KV"'
ENVOY_INGRESS = 'envoy_http_conn_manager_prefix="dkv_ingress"'  # the front door's listener
ENVOY_GATEWAYS = 'envoy_cluster_name="dkv_gateway"'  # the cluster of gateway replicas
ENVOY_RATE_LIMIT = 'envoy_local_http_ratelimit_prefix="dkv_local_rate_limit"'
# Every process with a Raft group and a RocksDB: the storage nodes and membership's replicas.
STORAGE_JOBS = 'job=~"dkv-node|dkv-membership"'


@dataclass(frozen=True)
class Q:
    """One query of a panel: PromQL and its legend (``{{label}}`` placeholders)."""

    expr: str
    legend: str = ""


def quantiles(metric: str, by: str, selector: str, qs: Sequence[float] = (0.5, 0.99)) -> list[Q]:
    """``histogram_quantile`` of a histogram for each of ``qs``, grouped by ``by`` (``le`` is
    added), legend ``p50 <by labels>``."""
    labels = [b.strip() for b in by.split(",") if b.strip()]
    group = ", ".join(["le", *labels])
    legend = " ".join("{{" + label + "}}" for label in labels)
    return [
        Q(
            f"histogram_quantile({q:g}, sum by ({group}) "
            f"(rate({metric}_bucket{{{selector}}}[{RATE}])))",
            f"p{round(q * 100)} {legend}".strip(),
        )
        for q in qs
    ]


def _targets(queries: Sequence[Q]) -> list[Dataquery]:
    return [
        Dataquery().expr(q.expr).legend_format(q.legend or "__auto").ref_id(ref)
        for q, ref in zip(queries, string.ascii_uppercase, strict=False)
    ]


def timeseries(
    title: str,
    description: str,
    unit: str,
    queries: Sequence[Q],
    *,
    w: int = 12,
    h: int = 8,
    stacked: bool = False,
    min_zero: bool = True,
) -> TimeseriesPanel:
    panel = (
        TimeseriesPanel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(w)
        .height(h)
        .targets(list(_targets(queries)))
    )
    if min_zero:
        panel = panel.min(0)
    if stacked:
        panel = panel.fill_opacity(20).stacking(StackingConfig().mode(StackingMode.NORMAL))
    return panel


def stat(
    title: str,
    description: str,
    queries: Sequence[Q],
    *,
    unit: str = "short",
    w: int = 6,
    h: int = 4,
    red_from: float | None = None,
) -> StatPanel:
    """A single figure; ``red_from``: green below, red from there on (a problem count)."""
    panel = (
        StatPanel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(w)
        .height(h)
        .graph_mode(BigValueGraphMode.AREA)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .targets(list(_targets(queries)))
    )
    if red_from is not None:
        panel = panel.thresholds(
            ThresholdsConfig()
            .mode(model.ThresholdsMode.ABSOLUTE)
            .steps([model.Threshold(value=None, color="green"), model.Threshold(red_from, "red")])
        )
    return panel


def heatmap(
    title: str, description: str, unit: str, metric: str, selector: str, *, w: int = 24, h: int = 8
) -> HeatmapPanel:
    """A histogram's buckets over time: how many observations fell in each per rate window
    (``format: heatmap`` turns Prometheus's cumulative ``le`` buckets into cells)."""
    query = (
        Dataquery()
        .expr(f"sum by (le) (increase({metric}_bucket{{{selector}}}[{RATE}]))")
        .legend_format("{{le}}")
        .format(PromQueryFormat.HEATMAP)
        .ref_id("A")
    )
    return (
        HeatmapPanel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .span(w)
        .height(h)
        .targets([query])
        .calculate(False)  # the buckets are Prometheus's, not Grafana's
        .y_axis(YAxisConfig().unit(unit))
        .color(
            HeatmapColorOptions()
            .mode(HeatmapColorMode.SCHEME)
            .scheme("Oranges")
            .scale(HeatmapColorScale.EXPONENTIAL)
            .exponent(0.5)
            .steps(64)  # Grafana's defaults, spelt out (the SDK's zero values are not)
            .fill("dark-orange")
        )
        .cell_gap(1)
        .show_value(VisibilityMode.NEVER)
        .show_y_histogram()
    )


def dashboard(uid: str, title: str, description: str) -> Dashboard:
    """The frame every dkv dashboard shares: datasource variable, links to the others."""
    return (
        Dashboard(title)
        .uid(uid)
        .description(description)
        .tags([TAG])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .link(
            DashboardLink("dkv dashboards")
            .type(model.DashboardLinkType.DASHBOARDS)
            .tags([TAG])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        # What Grafana adds to every dashboard it saves; some of its loaders expect the list.
        .annotation(
            AnnotationQuery()
            .name("Annotations & Alerts")
            .datasource(model.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
            .built_in(1)
            .enable(True)
            .hide(True)
            .icon_color("rgba(0, 211, 255, 1)")
            .type("dashboard")
        )
    )


# -- the dashboards ---------------------------------------------------------------------------


def cluster_overview() -> Dashboard:
    return (
        dashboard(
            "dkv-overview",
            "dkv / Cluster overview",
            "Is dkv serving? Traffic and latency at the front door, leaders per node, shard "
            "health and node states.",
        )
        .with_row(Row("Health"))
        .with_panel(
            stat(
                "Shards without a leader",
                "Shards whose leader is unknown or on a node that is not UP (membership's "
                "view, dkv.cluster_health: the same definition as dkvctl status). Writes to "
                "them fail.",
                [Q('max(dkv_membership_shards{job="dkv-membership", health="no_leader"})')],
                red_from=1,
            )
        )
        .with_panel(
            stat(
                "Under-replicated shards",
                "Shards with a voter on a node that is not UP, or fewer voters than the "
                "replication factor. They serve, with less fault tolerance.",
                [Q('max(dkv_membership_shards{job="dkv-membership", health="under_replicated"})')],
                red_from=1,
            )
        )
        .with_panel(
            stat(
                "Nodes by state",
                "Storage nodes in the cluster map, by liveness state (membership's view).",
                [Q('max by (state) (dkv_membership_nodes{job="dkv-membership"})', "{{state}}")],
            )
        )
        .with_panel(
            stat(
                "Targets up",
                "Scrape targets answering, by job (Prometheus's up).",
                [Q('sum by (job) (up{job=~"dkv-.*|envoy"})', "{{job}}")],
            )
        )
        .with_row(Row("Front door"))
        .with_panel(
            timeseries(
                "Requests/s by method and code",
                "KV calls answered by the gateways, by gRPC method and status code "
                "(go-grpc-prometheus's grpc_server_handled_total; a Watch counts when it ends).",
                "reqps",
                [
                    Q(
                        "sum by (grpc_method, grpc_code) (rate(grpc_server_handled_total"
                        f"{{{FRONT_DOOR_KV}}}[{RATE}]))",
                        "{{grpc_method}} {{grpc_code}}",
                    )
                ],
            )
        )
        .with_panel(
            timeseries(
                "Latency by method (p50, p99)",
                "Time the gateways took to answer unary KV calls, by method.",
                "s",
                quantiles(
                    "grpc_server_handling_seconds",
                    "grpc_method",
                    f'{FRONT_DOOR_KV}, grpc_type="unary"',
                ),
            )
        )
        .with_panel(
            timeseries(
                "Envoy: requests/s by HTTP status class",
                "Requests through the front door listener, by HTTP status class. gRPC "
                "errors travel in trailers of a 200: see the gateway's codes beside this.",
                "reqps",
                [
                    Q(
                        "sum by (envoy_response_code_class) (rate(envoy_http_downstream_rq_xx"
                        f"{{{ENVOY_INGRESS}}}[{RATE}]))",
                        "{{envoy_response_code_class}}xx",
                    )
                ],
            )
        )
        .with_panel(
            timeseries(
                "Envoy: request duration (p50, p99)",
                "From the first byte received to the last byte sent, at the front door "
                "(includes the gateway and the nodes; a watch stream counts its whole life).",
                "ms",
                quantiles("envoy_http_downstream_rq_time", "", ENVOY_INGRESS),
            )
        )
        .with_row(Row("Shards and nodes"))
        .with_panel(
            timeseries(
                "Leaders per node",
                "Shards each storage node leads. Balanced leadership spreads the write load.",
                "short",
                [Q('sum by (instance) (dkv_raft_is_leader{job="dkv-node"})', "{{instance}}")],
                w=8,
                stacked=True,
            )
        )
        .with_panel(
            timeseries(
                "Shards by health",
                "healthy, under_replicated, no_leader (every value always present).",
                "short",
                [Q('max by (health) (dkv_membership_shards{job="dkv-membership"})', "{{health}}")],
                w=8,
                stacked=True,
            )
        )
        .with_panel(
            timeseries(
                "Nodes by state",
                "up, down (no heartbeat for --down-after-ms), leaving (being drained).",
                "short",
                [Q('max by (state) (dkv_membership_nodes{job="dkv-membership"})', "{{state}}")],
                w=8,
                stacked=True,
            )
        )
    )


def raft() -> Dashboard:
    job = 'job="$job"'
    return (
        dashboard(
            "dkv-raft",
            "dkv / Raft",
            "Every shard's Raft group (or membership's own, with job = dkv-membership): "
            "leadership, the log, proposals, fsync, snapshots and peers.",
        )
        .with_variable(
            CustomVariable("job")
            .label("Raft groups of")
            .values("dkv-node,dkv-membership")
            .current(model.VariableOption(selected=True, text="dkv-node", value="dkv-node"))
        )
        .with_row(Row("Leadership"))
        .with_panel(
            stat(
                "Shards without a leader",
                "Shards no replica sees a leader for (a lone partitioned replica does not "
                "count): they accept no writes. DkvShardNoLeader fires after 1 minute.",
                [Q(f"count(max by (shard) (dkv_raft_has_leader{{{job}}}) == 0) or vector(0)")],
                red_from=1,
            )
        )
        .with_panel(
            stat(
                "Leader changes, last hour",
                "Sum over shards of the most changes any replica saw. Frequent elections mean "
                "overloaded nodes, slow disks or a flaky network.",
                [
                    Q(
                        "sum(max by (shard) (increase(dkv_raft_leader_changes_seen_total"
                        f"{{{job}}}[1h])))"
                    )
                ],
                red_from=4,
            )
        )
        .with_panel(
            stat(
                "Highest term",
                "The largest Raft term of any shard.",
                [Q(f"max(dkv_raft_term{{{job}}})")],
            )
        )
        .with_panel(
            stat(
                "Proposals pending",
                "Proposals waiting to be committed, all shards.",
                [Q(f"sum(dkv_raft_proposals_pending{{{job}}})")],
            )
        )
        .with_panel(
            timeseries(
                "Term by shard",
                "Each shard's term (the highest any replica reports). A term that climbs "
                "means elections.",
                "short",
                [Q(f"max by (shard) (dkv_raft_term{{{job}}})", "shard {{shard}}")],
                min_zero=False,
            )
        )
        .with_panel(
            timeseries(
                "Leader changes by shard",
                "Leader changes per interval, the most any replica of the shard saw.",
                "short",
                [
                    Q(
                        "max by (shard) (increase(dkv_raft_leader_changes_seen_total"
                        f"{{{job}}}[{RATE}]))",
                        "shard {{shard}}",
                    )
                ],
            )
        )
        .with_row(Row("Log and proposals"))
        .with_panel(
            timeseries(
                "Commit lag behind the leader",
                "Per shard: the highest commit index any replica knows minus the lowest applied "
                "index of a replica. Grows when a replica falls behind.",
                "short",
                [
                    Q(
                        f"max by (shard) (dkv_raft_commit_index{{{job}}}) - "
                        f"min by (shard) (dkv_raft_applied_index{{{job}}})",
                        "shard {{shard}}",
                    )
                ],
            )
        )
        .with_panel(
            timeseries(
                "Apply lag (commit - applied) per replica",
                "Entries a replica knows committed but has not applied to its state machine.",
                "short",
                [
                    Q(
                        f"dkv_raft_commit_index{{{job}}} - dkv_raft_applied_index{{{job}}}",
                        "{{instance}} shard {{shard}}",
                    )
                ],
            )
        )
        .with_panel(
            timeseries(
                "Proposals committed and applied/s",
                "Log entries committed and applied per second, all shards (as one replica "
                "of each sees them).",
                "ops",
                [
                    Q(
                        "sum(max by (shard) (rate(dkv_raft_proposals_committed_total"
                        f"{{{job}}}[{RATE}])))",
                        "committed",
                    ),
                    Q(
                        "sum(max by (shard) (rate(dkv_raft_proposals_applied_total"
                        f"{{{job}}}[{RATE}])))",
                        "applied",
                    ),
                    Q(
                        f"sum(max by (shard) (rate(dkv_raft_read_indexes_total{{{job}}}[{RATE}])))",
                        "read indexes",
                    ),
                ],
            )
        )
        .with_panel(
            timeseries(
                "Proposals failed/s and pending",
                "Failed: timed out or dropped (e.g. by a leader change). Pending: waiting "
                "to commit.",
                "short",
                [
                    Q(
                        f"sum by (shard) (rate(dkv_raft_proposals_failed_total{{{job}}}[{RATE}]))",
                        "failed/s shard {{shard}}",
                    ),
                    Q(
                        f"sum by (shard) (dkv_raft_proposals_pending{{{job}}})",
                        "pending shard {{shard}}",
                    ),
                ],
            )
        )
        .with_row(Row("Disk, snapshots and peers"))
        .with_panel(
            timeseries(
                "WAL fsync p99",
                "The group commit's synced write, per process. DkvHighFsyncDurations fires "
                "above 0.5 s for 10 minutes.",
                "s",
                quantiles("dkv_disk_wal_fsync_duration_seconds", "instance", job, qs=(0.99,)),
            )
        )
        .with_panel(
            timeseries(
                "Snapshots/s",
                "Snapshots taken (log compaction), sent to a lagging follower (counted on the "
                "last chunk of InstallSnapshot), and installed.",
                "ops",
                [
                    Q(
                        f"sum by (kind) (rate(dkv_raft_snapshots_total{{{job}}}[{RATE}]))",
                        "{{kind}}",
                    )
                ],
            )
        )
        .with_panel(
            timeseries(
                "Peer round trip p99",
                "From writing a batch of Raft messages to a peer to the acknowledgement that "
                "counts it, per process and peer node id.",
                "s",
                quantiles(
                    "dkv_network_peer_round_trip_time_seconds", "instance, to", job, qs=(0.99,)
                ),
            )
        )
        .with_panel(
            timeseries(
                "Peer send failures/s",
                "Batches of Raft messages that could not be sent, per process and peer.",
                "ops",
                [
                    Q(
                        "sum by (instance, to) (rate(dkv_network_peer_sent_failures_total"
                        f"{{{job}}}[{RATE}]))",
                        "{{instance}} → {{to}}",
                    )
                ],
            )
        )
    )


def gateway_envoy() -> Dashboard:
    gw = 'job="dkv-gateway"'
    return (
        dashboard(
            "dkv-gateway",
            "dkv / Gateway & Envoy",
            "The gateways' routing (calls to nodes, retries, leader hints, fan-out, watches, "
            "cluster map) and Envoy's front door (retries, upstream errors, rate limiting).",
        )
        .with_row(Row("Gateway → nodes"))
        .with_panel(
            timeseries(
                "Calls to nodes/s by method and code",
                "The gateways' gRPC calls to storage nodes (grpc_client_handled_total).",
                "reqps",
                [
                    Q(
                        "sum by (grpc_method, grpc_code) (rate(grpc_client_handled_total"
                        f"{{{gw}}}[{RATE}]))",
                        "{{grpc_method}} {{grpc_code}}",
                    )
                ],
            )
        )
        .with_panel(
            timeseries(
                "Call latency to nodes (p50, p99)",
                "Unary calls from the gateways to storage nodes, by method.",
                "s",
                quantiles(
                    "grpc_client_handling_seconds", "grpc_method", f'{gw}, grpc_type="unary"'
                ),
            )
        )
        .with_panel(
            timeseries(
                "Retries/s by reason",
                "Calls the gateway retried: not_leader (followed a leader hint), unavailable, "
                "cancelled, leader_moved (the shard's leadership moved while an attempt waited).",
                "ops",
                [
                    Q(
                        f"sum by (reason) (rate(dkv_gateway_retries_total{{{gw}}}[{RATE}]))",
                        "{{reason}}",
                    )
                ],
            )
        )
        .with_panel(
            timeseries(
                "Leader hints and unreachable shards/s",
                "Hits: the cached leader answered. Misses: it was not the leader any more. "
                "Unreachable: no replica of the shard could be reached.",
                "ops",
                [
                    Q(f"sum(rate(dkv_gateway_leader_hint_hits_total{{{gw}}}[{RATE}]))", "hits"),
                    Q(
                        f"sum(rate(dkv_gateway_leader_hint_misses_total{{{gw}}}[{RATE}]))",
                        "misses",
                    ),
                    Q(
                        f"sum(rate(dkv_gateway_shard_unreachable_total{{{gw}}}[{RATE}]))",
                        "unreachable",
                    ),
                ],
            )
        )
        .with_row(Row("Ranges, watches, cluster map"))
        .with_panel(
            timeseries(
                "Range fan-out: shards per request (p50, p99)",
                "Shards a range over a key span was split into (one call to each leader).",
                "short",
                quantiles("dkv_gateway_fanout_shards", "", gw),
                w=8,
            )
        )
        .with_panel(
            timeseries(
                "Watch streams",
                "Client watches open on the gateways, the per-shard watches the nodes serve "
                "for them, and the events the nodes send.",
                "short",
                [
                    Q(f"sum(dkv_gateway_watches{{{gw}}})", "gateway watches"),
                    Q('sum(dkv_node_watchers{job="dkv-node"})', "node watchers"),
                    Q(
                        f'sum(rate(dkv_node_watch_events_sent_total{{job="dkv-node"}}[{RATE}]))',
                        "events sent/s",
                    ),
                ],
                w=8,
            )
        )
        .with_panel(
            timeseries(
                "Cluster map age and version",
                "Seconds since each gateway last received the cluster map from membership "
                "(it is pushed on every change), and the map versions: the gateways' should "
                "follow membership's.",
                "short",
                [
                    Q(
                        f"max by (instance) (dkv_gateway_cluster_map_age_seconds{{{gw}}})",
                        "age (s) {{instance}}",
                    ),
                    Q(
                        f"max by (instance) (dkv_gateway_cluster_map_version{{{gw}}})",
                        "version {{instance}}",
                    ),
                    Q('max(dkv_membership_map_version{job="dkv-membership"})', "membership"),
                ],
                w=8,
            )
        )
        .with_row(Row("Access control"))
        .with_panel(
            timeseries(
                "Calls refused/s by reason",
                "Refusals by the access policy and the component-only ports, every process "
                "(docs/security.md): not_permitted (the policy said no), component_only (the "
                "wrong identity for an internal port), unauthenticated (no identity), no_rule.",
                "ops",
                [
                    Q(
                        f"sum by (job, reason) (rate(dkv_auth_denied_total[{RATE}]))",
                        "{{job}} {{reason}}",
                    )
                ],
                w=12,
            )
        )
        .with_panel(
            timeseries(
                "Forged XFCC and policy reloads",
                "x-forwarded-client-cert headers ignored because the peer was not Envoy (a "
                "forgery or a misconfigured proxy), and reloads of the access policy by result "
                "(failed: a bad edit, the previous policy kept).",
                "short",
                [
                    Q(
                        f"sum(increase(dkv_auth_forged_xfcc_total{{{gw}}}[{RATE}]))",
                        "forged XFCC",
                    ),
                    Q(
                        f"sum by (result) (increase(dkv_auth_policy_reloads_total[{RATE}]))",
                        "reloads {{result}}",
                    ),
                ],
                w=12,
            )
        )
        .with_row(Row("Envoy (front door)"))
        .with_panel(
            timeseries(
                "Envoy retries/s",
                "Retries Envoy made to the gateways: reads on transient failures, writes only "
                "when they never reached a gateway.",
                "ops",
                [
                    Q(
                        f"sum(rate(envoy_cluster_upstream_rq_retry{{{ENVOY_GATEWAYS}}}[{RATE}]))",
                        "retried",
                    ),
                    Q(
                        "sum(rate(envoy_cluster_upstream_rq_retry_success"
                        f"{{{ENVOY_GATEWAYS}}}[{RATE}]))",
                        "succeeded",
                    ),
                    Q(
                        "sum(rate(envoy_cluster_upstream_rq_retry_limit_exceeded"
                        f"{{{ENVOY_GATEWAYS}}}[{RATE}]))",
                        "limit exceeded",
                    ),
                    Q(
                        "sum(rate(envoy_cluster_upstream_rq_retry_overflow"
                        f"{{{ENVOY_GATEWAYS}}}[{RATE}]))",
                        "overflow (retry budget)",
                    ),
                ],
            )
        )
        .with_panel(
            timeseries(
                "Envoy upstream errors/s",
                "Envoy's own failures reaching the gateways (local-origin: what takes a "
                "gateway out of rotation).",
                "ops",
                [
                    Q(
                        f"sum(rate(envoy_cluster_{stat}{{{ENVOY_GATEWAYS}}}[{RATE}]))",
                        legend,
                    )
                    for stat, legend in [
                        ("upstream_cx_connect_fail", "connect failures"),
                        ("upstream_cx_connect_timeout", "connect timeouts"),
                        ("upstream_rq_timeout", "request timeouts"),
                        ("upstream_rq_per_try_timeout", "per-try timeouts"),
                        ("upstream_rq_rx_reset", "reset by the gateway"),
                        ("upstream_rq_tx_reset", "reset by Envoy"),
                        ("upstream_rq_pending_overflow", "pending overflow"),
                        ("upstream_cx_none_healthy", "no healthy gateway"),
                    ]
                ],
            )
        )
        .with_panel(
            timeseries(
                "Envoy upstream requests/s by HTTP status class",
                "Requests Envoy sent to the gateways, by HTTP status class (gRPC errors are "
                "200s with a grpc-status trailer).",
                "reqps",
                [
                    Q(
                        "sum by (envoy_response_code_class) (rate(envoy_cluster_upstream_rq_xx"
                        f"{{{ENVOY_GATEWAYS}}}[{RATE}]))",
                        "{{envoy_response_code_class}}xx",
                    )
                ],
            )
        )
        .with_panel(
            timeseries(
                "Rate-limited requests/s",
                "Envoy's local rate limit at the front door: requests refused "
                "(RESOURCE_EXHAUSTED, never retried by clients as UNAVAILABLE) and let through.",
                "reqps",
                [
                    Q(
                        "sum(rate(envoy_http_local_rate_limit_rate_limited"
                        f"{{{ENVOY_RATE_LIMIT}}}[{RATE}]))",
                        "rate limited",
                    ),
                    Q(
                        f"sum(rate(envoy_http_local_rate_limit_ok{{{ENVOY_RATE_LIMIT}}}[{RATE}]))",
                        "ok",
                    ),
                ],
            )
        )
        .with_panel(
            timeseries(
                "Gateways in rotation",
                "Gateways Envoy knows, those passing health checks, and those ejected by "
                "outlier detection (local-origin failures only).",
                "short",
                [
                    Q(f"sum(envoy_cluster_membership_total{{{ENVOY_GATEWAYS}}})", "known"),
                    Q(f"sum(envoy_cluster_membership_healthy{{{ENVOY_GATEWAYS}}})", "healthy"),
                    Q(
                        "sum(envoy_cluster_outlier_detection_ejections_active"
                        f"{{{ENVOY_GATEWAYS}}})",
                        "ejected",
                    ),
                ],
            )
        )
        .with_panel(
            timeseries(
                "Envoy → gateway request time (p50, p99)",
                "Time from Envoy's first byte upstream to the gateway's last byte back.",
                "ms",
                quantiles("envoy_cluster_upstream_rq_time", "", ENVOY_GATEWAYS),
            )
        )
    )


def storage() -> Dashboard:
    return (
        dashboard(
            "dkv-storage",
            "dkv / Storage",
            "RocksDB and the group commit on every storage node and membership replica: "
            "size, batches, fsync and commit durations, compactions.",
        )
        .with_row(Row("Size"))
        .with_panel(
            timeseries(
                "DB size",
                "RocksDB's estimate of live data plus SST files, per process.",
                "bytes",
                [
                    Q(
                        f"max by (job, instance) (dkv_storage_db_size_bytes{{{STORAGE_JOBS}}})",
                        "{{job}} {{instance}}",
                    )
                ],
            )
        )
        .with_panel(
            timeseries(
                "Keys and request ids by shard",
                "Live keys per shard, and the entries of the request-id table that makes "
                "retried writes idempotent (the most any replica holds).",
                "short",
                [
                    Q('max by (shard) (dkv_node_keys{job="dkv-node"})', "keys shard {{shard}}"),
                    Q(
                        'max by (shard) (dkv_node_request_ids{job="dkv-node"})',
                        "request ids shard {{shard}}",
                    ),
                ],
            )
        )
        .with_row(Row("Group commit"))
        .with_panel(
            timeseries(
                "Entries per batch (p50, p99)",
                "Raft entries written by one group-commit batch (one synced RocksDB write). "
                "Bigger batches amortize the fsync.",
                "short",
                quantiles("dkv_disk_batch_entries", "job", STORAGE_JOBS),
                w=8,
            )
        )
        .with_panel(
            timeseries(
                "Bytes per batch (p50, p99)",
                "Bytes written by one group-commit batch.",
                "bytes",
                quantiles("dkv_disk_batch_bytes", "job", STORAGE_JOBS),
                w=8,
            )
        )
        .with_panel(
            timeseries(
                "Batches and entries/s",
                "Group-commit batches per second (one fsync each) and Raft entries persisted "
                "per second, per process.",
                "ops",
                [
                    Q(
                        "sum by (instance) (rate(dkv_disk_wal_fsync_duration_seconds_count"
                        f"{{{STORAGE_JOBS}}}[{RATE}]))",
                        "batches {{instance}}",
                    ),
                    Q(
                        "sum by (instance) (rate(dkv_raft_entries_persisted_total"
                        f"{{{STORAGE_JOBS}}}[{RATE}]))",
                        "entries {{instance}}",
                    ),
                ],
                w=8,
            )
        )
        .with_panel(
            timeseries(
                "WAL fsync duration (p50, p99)",
                "The synced write of a group-commit batch, per process (etcd's "
                "wal_fsync_duration_seconds).",
                "s",
                quantiles("dkv_disk_wal_fsync_duration_seconds", "instance", STORAGE_JOBS),
            )
        )
        .with_panel(
            timeseries(
                "Backend commit duration (p50, p99)",
                "The whole group-commit write to RocksDB, per process (etcd's "
                "backend_commit_duration_seconds).",
                "s",
                quantiles("dkv_disk_backend_commit_duration_seconds", "instance", STORAGE_JOBS),
            )
        )
        .with_panel(
            heatmap(
                "WAL fsync duration histogram",
                "Group-commit fsyncs per duration bucket, every storage process together: "
                "a second band, or mass drifting up, is a slow disk before the p99 says so.",
                "s",
                "dkv_disk_wal_fsync_duration_seconds",
                STORAGE_JOBS,
            )
        )
        .with_row(Row("Compactions"))
        .with_panel(
            timeseries(
                "Compactions/s and running",
                "RocksDB compactions finished per second and running now, per process.",
                "short",
                [
                    Q(
                        "sum by (instance) (rate(dkv_storage_compactions_total"
                        f"{{{STORAGE_JOBS}}}[{RATE}]))",
                        "finished/s {{instance}}",
                    ),
                    Q(
                        f"max by (instance) (dkv_storage_compactions_running{{{STORAGE_JOBS}}})",
                        "running {{instance}}",
                    ),
                ],
            )
        )
        .with_panel(
            timeseries(
                "Compaction pending bytes",
                "RocksDB's estimate of bytes compaction still has to rewrite; steady growth "
                "means writes outpace compaction.",
                "bytes",
                [
                    Q(
                        "max by (instance) (dkv_storage_compaction_pending_bytes"
                        f"{{{STORAGE_JOBS}}})",
                        "{{instance}}",
                    )
                ],
            )
        )
    )


# File name -> builder. The Helm chart ships each file as a ConfigMap for Grafana's sidecar.
DASHBOARDS: dict[str, Callable[[], Dashboard]] = {
    "dkv-overview.json": cluster_overview,
    "dkv-raft.json": raft,
    "dkv-gateway.json": gateway_envoy,
    "dkv-storage.json": storage,
}


def _number_panels(board: model.Dashboard) -> None:
    """Unique panel ids in layout order (Grafana keys panel links and state on them)."""
    for i, panel in enumerate(board.panels or [], start=1):
        panel.id_val = i


def render() -> dict[str, str]:
    """File name -> the dashboard's JSON text, as committed."""
    encoder = JSONEncoder(sort_keys=True, indent=2, ensure_ascii=False)
    out = {}
    for name, build in DASHBOARDS.items():
        board = build().build()
        _number_panels(board)
        out[name] = encoder.encode(board) + "\n"
    return out


def stale(out_dir: Path) -> list[str]:
    """Files in ``out_dir`` that differ from what :func:`render` makes, are missing, or are
    left over from a dashboard that no longer exists."""
    rendered = render()
    problems = [
        name
        for name, text in rendered.items()
        if not (out_dir / name).is_file() or (out_dir / name).read_text() != text
    ]
    problems += sorted(p.name for p in out_dir.glob("*.json") if p.name not in rendered)
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where the JSON files go")
    parser.add_argument(
        "--check", action="store_true", help="only check that the files are up to date"
    )
    args = parser.parse_args(argv)
    out_dir: Path = args.out
    if args.check:
        problems = stale(out_dir)
        for name in problems:
            print(f"stale: {out_dir / name} (run `make dashboards`)", file=sys.stderr)
        return 1 if problems else 0
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (out_dir / name).write_text(text)
        print(f"wrote {out_dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
