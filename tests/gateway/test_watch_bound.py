"""Watches per caller are bounded at the gateway: one identity cannot hold every stream."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from gateway_stack import key_in_shard, running_stack

from dkv.security import PkiLayout, write_dev_pki
from dkv.v1 import kv_pb2


def test_a_caller_may_hold_only_so_many_watches(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_stack(tmp_path, tls=True, watches_per_caller_max=2) as st:
            pki = PkiLayout(tmp_path / "pki")
            write_dev_pki(pki.directory, [("user", "other")])  # the same CA: a second caller
            creds = grpc.ssl_channel_credentials(
                pki.ca_cert.read_bytes(),
                pki.key("other").read_bytes(),
                pki.cert("other").read_bytes(),
            )
            other = grpc.aio.secure_channel(st.gateway_address, creds)

            key = key_in_shard(1)
            put = await st.put(kv_pb2.PutRequest(key=key, value=b"v"))
            since = put.header.revision

            def watch_on(channel: grpc.aio.Channel) -> Any:
                # From a revision in the history: an admitted watch answers at once.
                return channel.unary_stream(
                    "/dkv.v1.KV/Watch",
                    request_serializer=kv_pb2.WatchRequest.SerializeToString,
                    response_deserializer=kv_pb2.WatchResponse.FromString,
                )(kv_pb2.WatchRequest(key=key, start_revision=since))

            async def opened(call: Any) -> None:
                resp = await asyncio.wait_for(call.read(), 20)
                assert resp is not grpc.aio.EOF

            assert st.channel is not None
            first, second = watch_on(st.channel), watch_on(st.channel)
            await opened(first)
            await opened(second)
            third = watch_on(st.channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in third:
                    pass
            assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (err.value.details() or "").startswith("user:client has 2 watches open")
            # Another caller is not affected.
            mine = watch_on(other)
            await opened(mine)
            # Closing one makes room again.
            first.cancel()
            loop = asyncio.get_running_loop()
            give_up = loop.time() + 20
            while True:
                again = watch_on(st.channel)
                try:
                    await opened(again)
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert loop.time() < give_up, "the closed watch was never released"
                    await asyncio.sleep(0.05)
            for call in (second, again, mine):
                call.cancel()
            await other.close()

    asyncio.run(scenario())
