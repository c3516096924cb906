"""The host runtime: an asyncio loop that drives many Raft groups with group commit.

See :mod:`dkv.host.host` for the loop and :mod:`dkv.host.transport` for peer transports.
"""

from dkv.host.host import Host, HostConfig, StateMachine
from dkv.host.transport import Delivery, MemoryNetwork, MemoryTransport, Transport

__all__ = [
    "Delivery",
    "Host",
    "HostConfig",
    "MemoryNetwork",
    "MemoryTransport",
    "StateMachine",
    "Transport",
]
