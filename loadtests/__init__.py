"""Load tests of a running dkv with locust (docs/loadtests.md): ``make loadtest``.

- :mod:`loadtests.locustfile`: the gRPC and HTTP/JSON users (loaded by locust only: it
  monkey-patches the process it runs in);
- :mod:`loadtests.workload`: keys, values, the operation mix and the read-back check, free of
  locust and gevent;
- :mod:`loadtests.run`: ``python -m loadtests.run``, a bounded headless run and its summary.
"""
