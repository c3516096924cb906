"""``dkvctl cluster ...`` run as a user would (a subprocess) against three in-process membership
replicas (the setup of test_service.py), and the MembershipClient it is built on.

The replicas live on this test's event loop, so dkvctl runs through
``asyncio.create_subprocess_exec`` and is awaited: the servers keep serving meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from itertools import pairwise
from pathlib import Path

from test_service import NAMES, Cluster, free_port, node

from dkv.client.membership import MembershipClient
from dkv.errors import DkvError
from dkv.sharding import SLOT_COUNT
from dkv.v1 import membership_pb2 as pb

SHARDS = 3


async def dkvctl(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from dkv.cli.dkvctl import main; main()", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def test_dkvctl_cluster_commands(tmp_path: Path) -> None:
    async def scenario() -> None:
        c = Cluster(tmp_path)
        try:
            for n in NAMES:
                await c.start(n)
            lname = await c.leader()
            leader = c.stubs[lname]
            for nid in (1, 2):
                await leader.join(node(nid))
            svc = c.servers[lname].service
            assert svc is not None
            init = pb.InitClusterCommand(
                shard_count=SHARDS,
                shards=[pb.Shard(id=i, voters=[1, 2] if i % 2 else [2, 1]) for i in (1, 2, 3)],
            )
            assert (await svc.propose(pb.MembershipCommand(init_cluster=init), 5)).accepted
            beat = pb.HeartbeatRequest(node_id=2, leaders=[pb.LeaderEntry(shard_id=2, term=4)])
            await leader.unary("Heartbeat", beat, pb.HeartbeatResponse)
            want = await c.converged()

            # Followers first: any replica answers (or points at the leader).
            order = sorted(NAMES, key=lambda n: n == lname)
            eps = ",".join(f"127.0.0.1:{c.servers[n].client_port}" for n in order)

            # The client library.
            async with MembershipClient(eps.split(",")) as mc:
                assert await mc.get_cluster_map() == want
                nodes, version = await mc.list_nodes()
                assert [n.name for n in nodes] == ["n1", "n2"] and version == want.version

            async def ctl(*args: str) -> tuple[int, str, str]:
                return await dkvctl(*args[:-1], "cluster", "--membership", eps, args[-1])

            rc, out, err = await ctl("nodes")
            assert rc == 0, err
            lines = out.splitlines()
            assert lines[0].split() == [
                "ID", "NAME", "STATE", "ZONE", "PEER", "CLIENT", "LAST_HEARTBEAT_AGO"
            ]  # fmt: skip
            assert [ln.split()[1:3] for ln in lines[1:]] == [["n1", "up"], ["n2", "up"]]
            assert lines[1].split()[0] == "1" and lines[1].split()[-1].endswith("s")

            rc, out, err = await ctl("-o", "json", "nodes")
            assert rc == 0, err
            data = json.loads(out)
            assert data["version"] == want.version
            assert [(n["name"], n["state"], n["client"]) for n in data["nodes"]] == [
                ("n1", "up", "10.0.0.1:2379"),
                ("n2", "up", "10.0.0.2:2379"),
            ]

            rc, out, err = await ctl("shards")
            assert rc == 0, err
            lines = out.splitlines()
            assert lines[0].split() == ["SHARD", "EPOCH", "VOTERS", "LEARNERS", "LEADER", "TERM"]
            assert [ln.split() for ln in lines[1:]] == [
                ["1", "1", "n1,n2", "-", "-", "-"],
                ["2", "1", "n2,n1", "-", "n2", "4"],
                ["3", "1", "n1,n2", "-", "-", "-"],
            ]

            rc, out, err = await ctl("slots")
            assert rc == 0, err
            lines = out.splitlines()
            assert lines[0].split() == ["SLOTS", "SHARD"]
            assert len(lines) == 1 + SHARDS and lines[1].split()[0].startswith("0-")
            assert lines[-1].split()[0].endswith(f"-{SLOT_COUNT - 1}")

            # `show` as JSON: everything, with the membership endpoints from the environment.
            rc, out, err = await dkvctl(
                "-o", "json", "cluster", "show", env={"DKVCTL_MEMBERSHIP": eps}
            )
            assert rc == 0, err
            data = json.loads(out)
            assert data["version"] == want.version
            assert [n["name"] for n in data["nodes"]] == ["n1", "n2"]
            assert len(data["shards"]) == SHARDS
            assert data["shards"][1]["leader"] == "n2" and data["shards"][1]["term"] == 4
            ranges = data["slot_ranges"]
            assert ranges[0]["start"] == 0 and ranges[-1]["end"] == SLOT_COUNT
            assert all(a["end"] == b["start"] for a, b in pairwise(ranges))
            assert {r["shard"] for r in ranges} == {1, 2, 3}
            rc, out, err = await ctl("show")
            assert rc == 0, err
            assert out.startswith(f"Cluster map version {want.version}\n")
            for title in ("Nodes:", "Shards:", "Slots:"):
                assert title in out.splitlines()
        finally:
            await c.close()

        # Unreachable membership: a clear message and exit code 1.
        dead = f"127.0.0.1:{free_port()}"
        rc, out, err = await dkvctl("--timeout", "0.5", "cluster", "--membership", dead, "nodes")
        assert rc == 1 and out == ""
        assert err.startswith(f"Error: membership service ({dead}):"), err
        async with MembershipClient([dead], timeout_s=0.3) as mc:
            try:
                await mc.get_cluster_map()
            except DkvError:
                pass
            else:
                raise AssertionError("an unreachable membership service must raise")

    asyncio.run(scenario())
