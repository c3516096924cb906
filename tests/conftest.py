"""Shared pytest options.

``--rewrite`` (or the environment variable ``DKV_REWRITE=1``) makes golden-file tests such as
``tests/raft/test_interaction.py`` regenerate their expected output in place instead of failing
on a difference. Review the resulting ``git diff``: the expected files are the specification.
"""

from __future__ import annotations

import os

import pytest

# Every dkv process a test starts serves /metrics; the default ports (2381, 2481, 2375) would
# collide between the processes of one test and between tests run in parallel. Tests that
# check the metrics pass their own --listen-metrics.
for _var in ("DKV_LISTEN_METRICS", "DKV_MEMBERSHIP_LISTEN_METRICS", "DKV_GATEWAY_LISTEN_METRICS"):
    os.environ.setdefault(_var, "127.0.0.1:0")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--rewrite",
        action="store_true",
        default=False,
        help="regenerate the expected output of golden-file tests (also: DKV_REWRITE=1)",
    )


@pytest.fixture
def rewrite(request: pytest.FixtureRequest) -> bool:
    """Whether golden-file tests should rewrite their expected output."""
    return bool(request.config.getoption("--rewrite")) or os.environ.get("DKV_REWRITE") == "1"
