"""The alert rules in prometheus/rules.yaml, checked and unit-tested by Prometheus's own promtool.

Every alert must have a promtool case where it fires and one where it stays silent, so a rule
that can never fire (or always fires) fails here rather than on an operator's pager.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "prometheus" / "rules.yaml"
RULE_TESTS = ROOT / "prometheus" / "tests" / "rules_test.yaml"
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)"
)


def _alert_names() -> set[str]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["alert"] for g in doc["groups"] for r in g["rules"] if "alert" in r}


def _cases() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    return [c for t in doc["tests"] for c in t.get("alert_rule_test", [])]


@needs_promtool
def test_rules_are_valid() -> None:
    assert PROMTOOL is not None
    out = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_rule_unit_tests_pass() -> None:
    assert PROMTOOL is not None
    out = subprocess.run(
        [PROMTOOL, "test", "rules", str(RULE_TESTS)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=RULE_TESTS.parent,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    cases = _cases()
    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    silent = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    names = _alert_names()
    assert names, "no alert rules found"
    assert names - firing == set(), f"alerts never shown firing: {sorted(names - firing)}"
    assert names - silent == set(), f"alerts never shown silent: {sorted(names - silent)}"
    assert {c["alertname"] for c in cases} <= names, "a test names an alert that does not exist"


@needs_promtool
def test_a_broken_threshold_is_caught(tmp_path: Path) -> None:
    """The unit tests are not vacuous: the same cases fail against rules that never fire."""
    assert PROMTOOL is not None
    (tmp_path / "tests").mkdir()
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["expr"] = f"({rule['expr']}) and on() vector(0) > 1"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(doc))
    shutil.copy(RULE_TESTS, tmp_path / "tests" / "rules_test.yaml")
    out = subprocess.run(
        [PROMTOOL, "test", "rules", "tests/rules_test.yaml"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode != 0
    for name in _alert_names():
        assert f"alertname: {name}," in out.stdout + out.stderr, name
