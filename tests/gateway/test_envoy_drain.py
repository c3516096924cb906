"""`dkv envoy-drain` (the gateway pod's preStop hook) against a real Envoy: its listeners
drain and stop once Envoy's drain time is over, and the command waits the time it was given;
with no Envoy it fails at once."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from dkv.devstack import envoy_binary
from dkv.testing.cluster import free_ports


def _server_state(admin_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/server_info", timeout=5) as r:
        return str(json.loads(r.read())["state"])


def _stat(admin_port: int, name: str) -> int:
    url = f"http://127.0.0.1:{admin_port}/stats?format=json&filter=^{name}$"
    with urllib.request.urlopen(url, timeout=5) as r:
        return int(json.loads(r.read())["stats"][0]["value"])


def _drain(admin: str, wait_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "dkv"),
            "envoy-drain",
            f"--admin={admin}",
            f"--wait-s={wait_s}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_envoy_drain_puts_a_real_envoy_into_its_drain_and_waits(tmp_path: Path) -> None:
    admin_port, listen_port = free_ports(2)
    config = {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "door",
                    "address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": listen_port}
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.tcp_proxy",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions."
                                        "filters.network.tcp_proxy.v3.TcpProxy",
                                        "stat_prefix": "door",
                                        "cluster": "nowhere",
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "nowhere",
                    "type": "STATIC",
                    "load_assignment": {"cluster_name": "nowhere"},
                }
            ],
        },
    }
    bootstrap = tmp_path / "envoy.json"
    bootstrap.write_text(json.dumps(config))
    envoy = subprocess.Popen(
        [
            envoy_binary(),
            "--config-path",
            str(bootstrap),
            "--disable-hot-restart",
            "--drain-strategy",
            "immediate",
            "--drain-time-s",
            "1",
            "--base-id",
            str(admin_port),
            "--log-level",
            "warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # Envoy's admin answers once it has started: poll it, as probes do
            try:
                if _server_state(admin_port) == "LIVE":
                    break
            except OSError:
                pass
            assert envoy.poll() is None, "Envoy exited"
            assert time.monotonic() < deadline, "Envoy never became LIVE"
            time.sleep(0.1)
        assert _stat(admin_port, "listener_manager.listener_stopped") == 0
        started = time.monotonic()
        # Waiting longer than Envoy's drain time (1 s): the drain is over when it returns.
        done = _drain(f"127.0.0.1:{admin_port}", 2.0)
        assert done.returncode == 0, done.stderr
        assert time.monotonic() - started >= 2.0  # it waited the time it was given
        assert _stat(admin_port, "listener_manager.listener_stopped") == 1
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", listen_port)) != 0, "the listener still accepts"
    finally:
        envoy.terminate()
        envoy.wait(timeout=30)


def test_envoy_drain_without_an_envoy_fails_at_once_naming_the_address() -> None:
    (port,) = free_ports(1)
    done = _drain(f"127.0.0.1:{port}", 60)
    assert done.returncode == 1
    assert f"127.0.0.1:{port}/drain_listeners" in done.stderr
