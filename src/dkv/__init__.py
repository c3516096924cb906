"""dkv: a replicated, sharded key-value store for Kubernetes.

Sub-packages (see ``docs/`` and the README's layout section):

- :mod:`dkv.raft` -- the pure, deterministic Raft consensus core.
- :mod:`dkv.testing` -- the deterministic simulator and the linearizability checker.
- :mod:`dkv.errors` -- the one exception tree every layer raises from.
"""

__version__ = "0.1.0"
