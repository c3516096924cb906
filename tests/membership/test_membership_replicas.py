"""Growing the membership group at run time: one replica (as `make run` has), then two more
added with AddReplica, then the first one stopped and removed. The map survives every step.

In-process replicas, real gRPC on 127.0.0.1 and real RocksDB; the calls go through
MembershipClient (which follows NOT_LEADER) as dkvctl's would.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from dkv_membership.server import MembershipConfig, MembershipServer

from dkv.client.membership import MembershipClient
from dkv.errors import ConfChangeRejected, InvalidArgument
from dkv.v1 import membership_pb2 as pb

WAIT_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_membership_grows_from_one_to_three_replicas_and_loses_the_first(
    tmp_path: Path,
) -> None:
    peers = {n: f"127.0.0.1:{free_port()}" for n in ("m1", "m2", "m3")}
    clients = {n: f"127.0.0.1:{free_port()}" for n in ("m1", "m2", "m3")}

    def config(name: str, initial: dict[str, str], state: str) -> MembershipConfig:
        return MembershipConfig(
            name=name,
            data_dir=tmp_path / name,
            listen_peer=peers[name],
            listen_client=clients[name],
            initial_cluster=initial,
            initial_cluster_state=state,
            tick_interval_ms=10,
            snapshot_count=5,  # the joiners catch up from a snapshot
            snapshot_catchup_entries=1,
        )

    async def scenario() -> None:
        replicas: dict[str, MembershipServer] = {}
        m1 = MembershipServer(config("m1", {"m1": peers["m1"]}, "new"))
        await m1.start()
        replicas["m1"] = m1
        try:
            async with MembershipClient(list(clients.values()), timeout_s=WAIT_S) as mc:
                # Some map content first (nodes registered at m1, once it leads).
                assert m1.service is not None and m1.host is not None
                host = m1.host
                await host.wait_for(lambda: host.leader(1) == m1.id, WAIT_S)
                for i in range(1, 9):
                    node = pb.Node(
                        id=100 + i,
                        name=f"n{i}",
                        peer_address=f"10.0.0.{i}:2380",
                        client_address=f"10.0.0.{i}:2379",
                    )
                    cmd = pb.MembershipCommand(register_node=pb.RegisterNodeCommand(node=node))
                    assert (await m1.service.propose(cmd, 5.0)).accepted
                before = await mc.get_cluster_map()

                grown = {"m1": peers["m1"]}
                for name in ("m2", "m3"):
                    grown[name] = peers[name]
                    r = MembershipServer(config(name, dict(grown), "existing"))
                    await r.start()
                    replicas[name] = r
                    added = await mc.add_replica(name, peers[name])
                    assert {x.name for x in added if not x.is_learner} == set(grown)
                    # Idempotent: adding it again changes nothing.
                    again = await mc.add_replica(name, peers[name])
                    assert [(x.name, x.is_learner) for x in again] == [
                        (x.name, x.is_learner) for x in added
                    ]
                with pytest.raises(InvalidArgument, match="peer address"):
                    await mc.add_replica("m4", "nowhere")

                # The first replica goes away; m2 and m3 still hold the same map.
                await m1.stop()
                del replicas["m1"]
                async with MembershipClient(
                    [clients["m2"], clients["m3"]], timeout_s=WAIT_S
                ) as mc23:
                    after = await mc23.get_cluster_map()
                    assert after.nodes == before.nodes
                    left = await mc23.remove_replica("m1")
                    assert {x.name for x in left} == {"m2", "m3"}
                    with pytest.raises(ConfChangeRejected, match="last voting replica"):
                        # Two voters: removing one leaves one, then none is refused.
                        await mc23.remove_replica("m2")
                        await mc23.remove_replica("m3")
                    # The group still commits: a new registration goes through.
                    d = await mc23.describe()
                    assert d.leader_name in ("m2", "m3")
        finally:
            for r in replicas.values():
                await r.stop()

    asyncio.run(scenario())
