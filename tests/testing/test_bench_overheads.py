"""`make bench-overheads` runs and reports every row (its figures are for docs, not asserted)."""

from __future__ import annotations

import pytest

from bench import bench_overheads


def test_every_row_is_measured(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_overheads.main(["--n", "50"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert len(rows) == 13
    assert all(float(r.split()[-1]) > 0 for r in rows)
