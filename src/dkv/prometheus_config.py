"""A Prometheus for the local stack: what ``make run`` (``dkv dev``) starts beside dkv, and what
``tests/telemetry/test_dashboards.py`` runs every dashboard query against.

One generator, so the test checks the configuration ``make run`` uses: every dkv process's
``/metrics`` (jobs ``dkv-membership``, ``dkv-node``, ``dkv-gateway``, as the alert rules in
``prometheus/rules.yaml`` and the Grafana dashboards in ``grafana/`` expect them), Envoy's own
metrics at ``/stats/prometheus`` on its admin port (job ``envoy``), and the alert rules when the
file is found (a checkout has it; an installed wheel does not, and then there are no rules).

Prometheus itself is Debian's package (``apt-get install prometheus``, FIELD-NOTES): nothing
here downloads it. The configuration is written as JSON, which Prometheus reads as YAML (JSON is
a subset), so no YAML library is needed at run time.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ENVOY_JOB",
    "INSTALL_HINT",
    "EXAMPLE_QUERY",
    "ScrapeTarget",
    "argv",
    "binary",
    "config",
    "rules_file",
    "targets",
    "write_config",
]

ENVOY_JOB = "envoy"
INSTALL_HINT = "apt-get install prometheus"
# Printed by `dkv dev`'s banner: requests per second through the gateway, by method and code.
EXAMPLE_QUERY = (
    'sum by (grpc_method, grpc_code) (rate(grpc_server_handled_total{job="dkv-gateway"}[1m]))'
)
# A laptop's stack: a day of history is plenty, and keeps .dkv/prometheus small.
RETENTION = "1d"


@dataclass(frozen=True)
class ScrapeTarget:
    """One process to scrape: its job (the label dashboards and alerts select on), its metrics
    port on ``host`` and the path."""

    job: str
    port: int
    path: str = "/metrics"
    host: str = "127.0.0.1"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def targets(
    metrics_targets: Sequence[tuple[str, int]], envoy_admin: int | None
) -> list[ScrapeTarget]:
    """The scrape targets of a stack: ``metrics_targets`` as ``DevLayout.metrics_targets()``
    gives them ((job, port) of every dkv process), plus Envoy's admin port if any."""
    out = [ScrapeTarget(job, port) for job, port in metrics_targets]
    if envoy_admin is not None:
        out.append(ScrapeTarget(ENVOY_JOB, envoy_admin, path="/stats/prometheus"))
    return out


def config(
    scrape_targets: Sequence[ScrapeTarget],
    *,
    scrape_interval_s: float = 5.0,
    rules: Path | None = None,
) -> dict[str, Any]:
    """Prometheus's configuration (as a dict): one scrape job per job name, every target of
    that job under it, and ``rules`` as the only rule file."""
    interval = _duration(scrape_interval_s)
    jobs: dict[tuple[str, str], list[str]] = {}
    for t in scrape_targets:
        jobs.setdefault((t.job, t.path), []).append(t.address)
    return {
        "global": {
            "scrape_interval": interval,
            # Prometheus refuses a timeout longer than the interval (its default is 10 s).
            "scrape_timeout": interval,
            "evaluation_interval": interval,
        },
        "rule_files": [str(rules)] if rules is not None else [],
        "scrape_configs": [
            {
                "job_name": job,
                "metrics_path": path,
                "static_configs": [{"targets": addresses}],
            }
            for (job, path), addresses in jobs.items()
        ],
    }


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def rules_file() -> Path | None:
    """``prometheus/rules.yaml`` of the checkout this module runs from (an editable install, as
    ``make setup`` makes), else of the working directory; None when neither has it."""
    candidates = [
        Path(__file__).resolve().parents[2] / "prometheus" / "rules.yaml",  # src/dkv/ -> repo
        Path.cwd() / "prometheus" / "rules.yaml",
    ]
    return next((p for p in candidates if p.is_file()), None)


def binary() -> str | None:
    """The ``prometheus`` executable on PATH, or None."""
    return shutil.which("prometheus")


def argv(
    prometheus: str, config_path: Path, data_dir: Path, port: int, host: str = "127.0.0.1"
) -> list[str]:
    """The command line of a Prometheus serving on ``host:port`` with its TSDB in ``data_dir``."""
    return [
        prometheus,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={data_dir}",
        f"--storage.tsdb.retention.time={RETENTION}",
        f"--web.listen-address={host}:{port}",
        "--log.level=warn",
    ]


def _duration(seconds: float) -> str:
    """Prometheus's duration syntax: ``1s``, ``500ms``."""
    ms = round(seconds * 1000)
    if ms <= 0:
        raise ValueError(f"a scrape interval must be positive, not {seconds!r}")
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"
