"""The host-loop example in docs/raft.md runs, so the documentation cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "raft.md"


def test_host_loop_example_in_docs_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/raft.md should hold exactly one runnable example"
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)
    # The example's own asserts check replication; check it really elected a leader too.
    assert namespace["leader"] in (1, 2, 3)
    assert namespace["state"] == {i: {"greeting": "hello"} for i in (1, 2, 3)}
