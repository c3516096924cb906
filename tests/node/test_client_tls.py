"""Client mTLS end to end: three real dkv-node processes whose client ports demand a
certificate from our CA; dkvctl with certificates works (including requests a node must
forward to another shard's leader over mTLS); without one, or with another CA's, it fails
with a clear one-line error and exit code 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_node_grpc import free_port
from test_processes import Proc

from dkv.security import PkiLayout, write_dev_pki

NAMES = ("a", "b", "c")


def test_client_mtls_end_to_end(tmp_path: Path) -> None:
    pki = PkiLayout(tmp_path / "pki")
    write_dev_pki(pki.directory, [*(("node", n) for n in NAMES), ("client", "ops")])
    other = PkiLayout(tmp_path / "other")
    write_dev_pki(other.directory, [("client", "ops")])
    peer = {n: free_port() for n in NAMES}
    client = {n: free_port() for n in NAMES}
    cluster = ",".join(f"{n}=localhost:{peer[n]}" for n in NAMES)

    def tls(n: str, prefix: str) -> list[str]:
        return [f"--{prefix}cert-file", str(pki.cert(n)), f"--{prefix}key-file", str(pki.key(n)),
                f"--{prefix}trusted-ca-file", str(pki.ca_cert)]  # fmt: skip

    def args(n: str) -> list[str]:
        return ["--name", n, "--data-dir", str(tmp_path / n), "--initial-cluster", cluster,
                "--listen-peer", f"127.0.0.1:{peer[n]}",
                "--listen-client", f"127.0.0.1:{client[n]}",
                "--advertise-client", f"localhost:{client[n]}",
                "--shards", "2", "--tick-interval-ms", "20",
                *tls(n, "peer-"), *tls(n, "")]  # fmt: skip

    procs = [Proc(n, args(n), tmp_path / f"{n}.log") for n in NAMES]
    for p in procs:
        p.start()
    endpoints = ",".join(f"localhost:{client[n]}" for n in NAMES)

    def ctl(
        *args: str, layout: PkiLayout | None = pki, timeout_s: int = 20
    ) -> subprocess.CompletedProcess[str]:
        certs = []
        if layout is not None:
            certs = ["--cacert", str(pki.ca_cert), "--cert", str(layout.cert("ops")),
                     "--key", str(layout.key("ops"))]  # fmt: skip
        return subprocess.run(
            [sys.executable, "-c", "from dkv.cli.dkvctl import main; main()",
             "--endpoints", endpoints, "--timeout", str(timeout_s), *certs, *args],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    try:
        for i in range(6):
            r = ctl("put", f"t/{i}", f"v{i}")
            assert r.returncode == 0, r.stderr
        assert ctl("get", "t/3").stdout == "v3\n"
        # Split shard leadership across nodes, so the range delete below reaches a node that
        # must forward one shard's part to another node's client port (over mTLS).
        status = json.loads(ctl("-o", "json", "status").stdout)["shards"]
        leaders = {row["shard"]: row["id"] for row in status if row["role"] == "leader"}
        if leaders[1] == leaders[2]:
            other_id = next(row["id"] for row in status if row["id"] != leaders[1])
            r = ctl("leader", "transfer", "--shard", "2", "--to", other_id)
            assert r.returncode == 0, r.stderr
        r = ctl("del", "--prefix", "t/")
        assert r.stdout == "6\n", r.stderr
        # No certificate: the handshake fails; a clear error, exit code 1, no traceback.
        r = ctl("get", "t/1", layout=None, timeout_s=2)
        assert r.returncode == 1 and r.stderr.startswith("Error: ")
        assert "Traceback" not in r.stderr
        # A certificate from another CA: refused the same way.
        r = ctl("get", "t/1", layout=other, timeout_s=2)
        assert r.returncode == 1 and r.stderr.startswith("Error: ")
    finally:
        codes = [p.term() for p in procs]
    assert codes == [0, 0, 0]
