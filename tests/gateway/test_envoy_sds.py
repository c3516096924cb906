"""Envoy's certificates by file-based SDS (envoy_config ``sds_dir``): the resources, the files,
and a real Envoy that picks up rotated files without a restart."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from cryptography import x509
from dkv_gateway import envoy_config
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from dkv.devstack import envoy_binary
from dkv.security.certs import PkiLayout, write_dev_pki
from dkv.security.rotation import finish_ca_rotation, renew_leaves, start_ca_rotation

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def door(pki: PkiLayout, sds_dir: Path, port: int = 1) -> envoy_config.FrontDoor:
    files = envoy_config.TlsFiles(str(pki.cert("envoy")), str(pki.key("envoy")), str(pki.ca_cert))
    return envoy_config.FrontDoor(
        listen_port=port,
        gateways=[("127.0.0.1", 2)],
        listener_tls=files,
        upstream_tls=files,
        sds_dir=str(sds_dir),
    )


def make_pki(root: Path) -> PkiLayout:
    pki = PkiLayout(root / "certs")
    write_dev_pki(pki.directory, [("envoy", "envoy"), ("user", "admin")])
    return pki


def test_resources_name_sds_secrets_and_the_files_name_the_pem_files(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    d = door(pki, tmp_path / "sds")
    clusters, listeners = envoy_config.resources(d)
    context = tls_pb2.DownstreamTlsContext()
    listeners[0].filter_chains[0].transport_socket.typed_config.Unpack(context)
    common = context.common_tls_context
    assert not common.tls_certificates and not common.HasField("validation_context")
    (cert_sds,) = common.tls_certificate_sds_secret_configs
    ca_sds = common.combined_validation_context.validation_context_sds_secret_config
    for sds in (cert_sds, ca_sds):
        source = sds.sds_config.path_config_source
        assert source.path == str(tmp_path / "sds" / f"{sds.name}.json")
        assert source.watched_directory.path == str(tmp_path / "sds")
    upstream = tls_pb2.UpstreamTlsContext()
    clusters[0].transport_socket.typed_config.Unpack(upstream)
    assert upstream.common_tls_context.tls_certificate_sds_secret_configs[0].name == (
        "dkv_upstream_cert"
    )

    written = envoy_config.write_sds_files(d)
    assert sorted(os.path.basename(p) for p in written) == [
        "dkv_front_door_ca.json",
        "dkv_front_door_cert.json",
        "dkv_upstream_ca.json",
        "dkv_upstream_cert.json",
    ]
    cert = json.loads((tmp_path / "sds" / "dkv_front_door_cert.json").read_text())
    (secret,) = cert["resources"]
    assert secret["name"] == "dkv_front_door_cert"
    tls = secret["tls_certificate"]
    assert tls["certificate_chain"]["filename"] == str(pki.cert("envoy"))
    assert tls["watched_directory"]["path"] == str(pki.directory)
    assert envoy_config.write_sds_files(d) == [], "unchanged files are not rewritten"
    assert not list((tmp_path / "sds").glob("*.tmp"))


def test_without_sds_dir_the_contexts_name_the_files() -> None:
    files = envoy_config.TlsFiles("/c.crt", "/c.key", "/ca.crt")
    d = envoy_config.FrontDoor(listen_port=1, gateways=[("127.0.0.1", 2)], listener_tls=files)
    context = tls_pb2.DownstreamTlsContext()
    envoy_config.listener(d).filter_chains[0].transport_socket.typed_config.Unpack(context)
    assert context.common_tls_context.tls_certificates[0].certificate_chain.filename == "/c.crt"
    assert envoy_config.sds_secrets(d) == []


def _handshake(port: int, pki: PkiLayout, name: str) -> tuple[int, bool]:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(str(pki.cert(name)), str(pki.key(name)))
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        got = x509.load_der_x509_certificate(der).serial_number
        try:
            tls.sendall(H2_PREFACE)
            return got, bool(tls.recv(64))
        except (ssl.SSLError, OSError):
            return got, False


def _serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def test_a_real_envoy_follows_rotated_files(tmp_path: Path) -> None:
    """Envoy validates the configuration, serves the SDS-delivered certificate, survives a
    key written before its certificate (it keeps the old pair), and follows leaf and CA
    rotations, on the listener and the upstream context alike."""
    pki = make_pki(tmp_path)
    port, admin = _free_port(), _free_port()
    d = door(pki, tmp_path / "sds", port)
    envoy_config.write_sds_files(d)
    clusters, listeners = envoy_config.resources(d)
    config = envoy_config.bootstrap(ads_host="127.0.0.1", ads_port=1, admin_port=admin)
    config.ClearField("dynamic_resources")  # static: no ADS server in this test
    config.static_resources.clusters.extend(clusters)
    config.static_resources.listeners.extend(listeners)
    path = tmp_path / "envoy.json"
    envoy_config.write_bootstrap(str(path), config)
    envoy = envoy_binary()
    base_id = str(port)
    check = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(path), "--base-id", base_id],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    log = tmp_path / "envoy.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [envoy, "-c", str(path), "--base-id", base_id, "--concurrency", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def until(what: str, cond: object, timeout_s: float = 10.0) -> None:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    if cond():  # type: ignore[operator]
                        return
                except OSError:
                    pass
                assert proc.poll() is None, f"Envoy exited:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
                time.sleep(0.02)

        def certs() -> list[set[int]]:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/certs", timeout=5) as r:
                data = json.loads(r.read())
            return [
                {int(c["serial_number"], 16) for c in ctx["cert_chain"]}
                for ctx in data["certificates"]
            ]

        first = _serial(pki.cert("envoy"))
        until("Envoy serves", lambda: _handshake(port, pki, "admin") == (first, True))

        # A key alone (a rotation caught half-way): refused by Envoy, the old pair stays.
        keep = tmp_path / "keep"
        keep.mkdir()
        other = make_pki(tmp_path / "other")
        tmp = pki.key("envoy").with_suffix(".tmp")
        shutil.copyfile(other.key("envoy"), tmp)
        os.replace(tmp, pki.key("envoy"))  # a new key, the old certificate
        until("Envoy refuses the mismatched pair", lambda: "KEY_VALUES_MISMATCH" in log.read_text())
        assert _handshake(port, pki, "admin") == (first, True)
        new = renew_leaves(pki.directory, ["envoy"])["envoy"]
        until("the new leaf is served", lambda: _handshake(port, pki, "admin")[0] == new)
        until("both contexts have it", lambda: all(c == {new} for c in certs()))

        # The CA: a client of the new CA is accepted once the bundle holds both, and a
        # client of the old one refused once it is gone.
        shutil.copyfile(pki.cert("admin"), keep / "admin.crt")
        shutil.copyfile(pki.key("admin"), keep / "admin.key")
        start_ca_rotation(pki.directory)
        renew_leaves(pki.directory, signer="next")
        newest = _serial(pki.cert("envoy"))
        until(
            "a leaf of the new CA is accepted",
            lambda: _handshake(port, pki, "admin") == (newest, True),
        )
        finish_ca_rotation(pki.directory)
        old = PkiLayout(keep)
        shutil.copyfile(pki.ca_cert, keep / "ca.crt")  # trust the new CA: the server decides
        until("a leaf of the old CA is refused", lambda: not _handshake(port, old, "admin")[1])
        assert _handshake(port, pki, "admin") == (newest, True)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_bootstrap_gets_envoys_xds_certificate_by_sds_too(tmp_path: Path) -> None:
    """Envoy's client certificate for the gateway's xDS port follows rotations like the rest;
    the check that the server is the gateway (a URI SAN matcher) stays beside the SDS CA."""
    pki = make_pki(tmp_path)
    files = envoy_config.TlsFiles(str(pki.cert("envoy")), str(pki.key("envoy")), str(pki.ca_cert))
    sds = tmp_path / "sds"
    written = envoy_config.write_ads_sds_files(str(sds), files)
    assert sorted(os.path.basename(p) for p in written) == ["dkv_ads_ca.json", "dkv_ads_cert.json"]
    config = envoy_config.bootstrap(
        ads_host="127.0.0.1", ads_port=1, admin_port=_free_port(), ads_tls=files, sds_dir=str(sds)
    )
    (cluster,) = config.static_resources.clusters
    upstream = tls_pb2.UpstreamTlsContext()
    cluster.transport_socket.typed_config.Unpack(upstream)
    common = upstream.common_tls_context
    assert common.tls_certificate_sds_secret_configs[0].name == "dkv_ads_cert"
    combined = common.combined_validation_context
    assert combined.validation_context_sds_secret_config.name == "dkv_ads_ca"
    (matcher,) = combined.default_validation_context.match_typed_subject_alt_names
    assert matcher.matcher.exact == "spiffe://dkv/gateway"
    path = tmp_path / "bootstrap.json"
    envoy_config.write_bootstrap(str(path), config)
    check = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--base-id", str(_free_port())],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
