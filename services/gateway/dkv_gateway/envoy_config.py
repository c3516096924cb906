"""Envoy's configuration for dkv's front door, as typed xDS resources.

Pure functions: a :class:`FrontDoor` describing what we want in, protobuf messages from
``xds-protos`` out. :mod:`dkv_gateway.xds` serves the resources to Envoy over ADS;
:func:`bootstrap` builds the only file Envoy reads, which names nothing but the ADS server
(DESIGN.md, "Envoy").

What the resources say, and why (FIELD-NOTES.md, Envoy/xDS pitfalls):

- one listener on ``listen_host:listen_port`` with an HTTP connection manager (``AUTO`` codec, so
  gRPC over HTTP/2 and HTTP/JSON over HTTP/1.1 or HTTP/2 share the port). Routes are inline (no
  RDS warming). Filters: the local rate limit, the gRPC-JSON transcoder, then the router.
- the gRPC-JSON transcoder (``FrontDoor.http_json``) turns the ``google.api.http`` bindings of
  ``dkv.v1.KV`` (protos/dkv/v1/kv.proto, docs/http.md) into gRPC calls. Its descriptor set is
  package data (``dkv_descriptor.pb``, made by ``make proto``). A transcoded request leaves the
  filter as ``POST /dkv.v1.KV/<Method>`` and the filter clears the route cache, so the router
  picks the gRPC routes below with their retry policies: HTTP/JSON needs no routes of its own.
  gRPC statuses become HTTP statuses with a JSON body ``{"code", "message"}``
  (``convert_grpc_status``); bad JSON and unknown query parameters are 400s (unknown fields in
  a JSON body are dropped: the transcoder cannot be told to refuse them); streams (``Watch``)
  are newline-delimited JSON.
- request bodies are bounded before anything is forwarded (:mod:`dkv.sizes`): a gRPC request
  by ``grpc_request_bytes_max`` (dkv's largest valid request; the buffer filter, enabled on
  the routed routes, holds a request whole, which a unary request is anyway), an HTTP/JSON body
  by ``http_json_body_bytes_max`` (the transcoder; its base64 form). Envoy answers 413 itself,
  and ``local_reply_config`` makes that answer name the limit and, to a gRPC client, say
  RESOURCE_EXHAUSTED (Envoy's own mapping of 413 is UNKNOWN, which says "server sick").
- the local rate limit is a no-op unless ``filter_enabled`` and ``filter_enforced`` are 100%; it
  answers ``RESOURCE_EXHAUSTED`` (``rate_limited_as_resource_exhausted``) so gRPC clients do not
  retry it as ``UNAVAILABLE``.
- retries: reads (``Range``) are retried on any transient failure. Writes (``Put``, ``Delete``)
  only when the request provably never reached the gateway (``connect-failure``,
  ``refused-stream``): a reset or ``UNAVAILABLE`` after sending may come after the write was
  proposed, and retrying it could apply it twice. ``Watch`` is a stream and is never retried.
- the cluster ``dkv_gateway`` lists the gateway replicas as STATIC endpoints (no EDS warming)
  and speaks HTTP/2 upstream (Python gRPC servers need it). A caller's bad request must cost
  only that caller (issue 9), so what takes a gateway out of rotation is only what says *the
  gateway* is sick:

  - active gRPC health checks of ``dkv.v1.KV`` (the gateway says NOT_SERVING before it has a
    cluster map and while it shuts down);
  - outlier detection on *local-origin* failures only (connect failures, resets, Envoy's own
    timeouts): ``split_external_local_origin_errors`` with every external-status detector
    (5xx, gateway failure, success rate, failure percentage) not enforced. A gRPC status is
    the answer to one request -- INVALID_ARGUMENT for a bad body, UNAVAILABLE for a shard
    without quorum -- and says nothing about the gateway;
  - Envoy does not enforce the client's ``grpc-timeout`` itself (no ``max_stream_duration``):
    the header still travels to the gateway, which answers DEADLINE_EXCEEDED in time, and a
    client that gives up resets its own stream. Otherwise every short client deadline would
    be an upstream timeout, a local-origin failure, and a few of them would eject the gateway;
  - ``healthy_panic_threshold`` 1%: when every gateway is ejected or failing health checks,
    Envoy sends to all of them rather than answer "no healthy upstream" to everybody; with a
    single healthy gateway left it still gets all the traffic (gateways are interchangeable,
    unlike leaders). ``max_ejection_percent`` leaves at least half in rotation.
- bearer tokens (``FrontDoor.jwt``, off by default), for HTTP clients that cannot hold a
  client certificate (:mod:`dkv.security.tokens`): the listener then lets clients connect
  without a certificate (one that is presented is still verified), a header mutation removes
  any :data:`~dkv.security.tokens.SUBJECT_HEADER` a client sent, and ``jwt_authn`` checks an
  ``Authorization: Bearer`` token against a local JWKS file (signature, issuer, audience,
  expiry, lifetime), drops the token from the request and passes its ``sub`` on in that
  header. A request without a token passes (a certificate, or nothing: the gateway then
  answers UNAUTHENTICATED); a bad token is Envoy's 401, UNAUTHENTICATED to a gRPC client.
- tracing (``FrontDoor.tracing``, off by default): Envoy's OpenTelemetry tracer starts each
  request's trace (or joins the caller's ``traceparent``) and exports its spans over OTLP/gRPC
  to the cluster ``dkv_otlp``; the gateway's spans are children of Envoy's. Envoy samples
  requests without a sampled parent at ``sample_percent`` (the gateway's ratio), and health
  checks are not traced (they are Envoy's own, not requests).
- anything else answers locally and cleanly, never a stream error: gRPC calls to a service
  the front door does not route (``dkv.v1.Admin``, ``dkv.v1.Membership``, ...) answer
  UNIMPLEMENTED saying where it is served (Envoy turns a local reply to a gRPC request into a
  gRPC status); a KV path without a gRPC content type is a 415; an HTTP/JSON path with a
  method it does not take is a 405 with ``Allow``, after its body was read (the buffer filter,
  enabled on those routes only: answering while the client still uploads made curl report an
  HTTP/2 stream error); any other path is a 404.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    grpc_service_pb2,
    health_check_pb2,
)
from envoy.config.core.v3 import protocol_pb2 as core_protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.overload.v3 import overload_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.config.trace.v3 import http_tracer_pb2, opentelemetry_pb2
from envoy.extensions.filters.http.buffer.v3 import buffer_pb2
from envoy.extensions.filters.http.grpc_json_transcoder.v3 import transcoder_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_authn_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.resource_monitors.downstream_connections.v3 import (
    downstream_connections_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2 as tls_common_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2, token_bucket_pb2
from google.protobuf import any_pb2, duration_pb2, empty_pb2, json_format, wrappers_pb2

from dkv.errors import InvalidArgument
from dkv.security.tokens import AUDIENCE, ISSUER, SUBJECT_HEADER, TTL_S_MAX
from dkv.sizes import request_bytes_max

__all__ = [
    "ADMIN_CLUSTER_NAME",
    "ADS_CLUSTER_NAME",
    "STATS_LISTENER_NAME",
    "STATS_PATH",
    "admin_cluster",
    "stats_listener",
    "GATEWAY_CLUSTER_NAME",
    "TlsFiles",
    "Tracing",
    "OTLP_CLUSTER_NAME",
    "ENVOY_SERVICE_NAME",
    "otlp_cluster",
    "KV_SERVICE",
    "KV_SERVICE_PREFIX",
    "LISTENER_NAME",
    "READ_RETRY_ON",
    "WRITE_RETRY_ON",
    "FrontDoor",
    "Jwt",
    "bootstrap",
    "bootstrap_json",
    "gateway_cluster",
    "grpc_json_transcoder",
    "kv_descriptor_set",
    "listener",
    "resources",
    "write_bootstrap",
    "sds_secrets",
    "write_ads_sds_files",
    "write_sds_files",
    "write_secrets",
]

GATEWAY_CLUSTER_NAME = "dkv_gateway"
GATEWAY_SPIFFE_ID = "spiffe://dkv/gateway"
OTLP_CLUSTER_NAME = "dkv_otlp"
ENVOY_SERVICE_NAME = "dkv-envoy"
ADS_CLUSTER_NAME = "dkv_xds"
LISTENER_NAME = "dkv_front_door"
KV_SERVICE = "dkv.v1.KV"
KV_SERVICE_PREFIX = f"/{KV_SERVICE}/"
DESCRIPTOR_SET_RESOURCE = "dkv_descriptor.pb"
"""The ``FileDescriptorSet`` of kv.proto and its imports, next to this module (``make proto``)."""

# Envoy's retry conditions (x-envoy-retry-on / x-envoy-retry-grpc-on values).
READ_RETRY_ON = "connect-failure,refused-stream,reset,unavailable,cancelled"
"""Reads change nothing: any transient failure may be retried."""
WRITE_RETRY_ON = "connect-failure,refused-stream"
"""Writes: only failures that guarantee the gateway never saw the request."""

_HCM_NAME = "envoy.filters.network.http_connection_manager"
_TLS_NAME = "envoy.transport_sockets.tls"
_ROUTER_NAME = "envoy.filters.http.router"
_LOCAL_RATE_LIMIT_NAME = "envoy.filters.http.local_ratelimit"
_TRANSCODER_NAME = "envoy.filters.http.grpc_json_transcoder"
_BUFFER_NAME = "envoy.filters.http.buffer"
_HEADER_MUTATION_NAME = "envoy.filters.http.header_mutation"
_JWT_AUTHN_NAME = "envoy.filters.http.jwt_authn"
JWT_PROVIDER_NAME = "dkv"
_HTTP_PROTOCOL_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_OPENTELEMETRY_TRACER_NAME = "envoy.tracers.opentelemetry"

GRPC_REQUEST_BYTES_MAX = request_bytes_max()
"""One gRPC request message at most: dkv's largest valid request (:mod:`dkv.sizes`)."""
GRPC_FRAME_PREFIX_BYTES = 5
"""Each gRPC message travels behind a 5-byte prefix (compressed flag, length); Envoy's body
limits count it."""
JSON_SYNTAX_BYTES = 64 << 10
"""What a JSON body adds besides its base64: field names, quotes, numbers, whitespace."""


def http_json_bytes_max(grpc_request_bytes_max: int) -> int:
    """The largest JSON body of a request that is at most ``grpc_request_bytes_max`` as
    protobuf: base64 makes bytes 4/3 as long, plus :data:`JSON_SYNTAX_BYTES`."""
    return 4 * -(-grpc_request_bytes_max // 3) + JSON_SYNTAX_BYTES


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files Envoy reads itself (paths in the config: no key travels over xDS)."""

    cert_file: str
    key_file: str
    ca_file: str


@dataclass(frozen=True, slots=True)
class Tracing:
    """Where Envoy sends its spans (an OTLP/gRPC receiver, plaintext) and which share of the
    requests without a sampled parent it traces (``sample_percent``, 0-100)."""

    otlp_host: str
    otlp_port: int
    sample_percent: float = 100.0


@dataclass(frozen=True, slots=True)
class Jwt:
    """Bearer tokens Envoy accepts (module docstring): signed by a key of ``jwks_file`` (a path
    Envoy reads), issued by ``issuer`` for ``audience``."""

    jwks_file: str
    issuer: str = ISSUER
    audience: str = AUDIENCE


@dataclass(frozen=True, slots=True)
class FrontDoor:
    """The front door we want Envoy to be.

    ``gateways`` are the ``(host, port)`` addresses of the gateway replicas (gRPC, plaintext for
    now). Rates are per Envoy process: ``rate_limit_tokens_max`` requests may burst, refilled by
    ``rate_limit_tokens_per_fill`` every ``rate_limit_fill_interval_ms``.

    ``http_json`` serves the KV API as HTTP/JSON too (the transcoder).

    Sizes (module docstring): ``grpc_request_bytes_max`` bounds one gRPC request message (the
    gateway's own limit: dkv's largest valid request, :mod:`dkv.sizes`);
    ``http_json_body_bytes_max`` one JSON request body (None: the base64 form of the gRPC
    bound, :func:`http_json_bytes_max`); ``http_json_response_bytes_max`` one unary JSON answer,
    which the transcoder holds whole (a 4 MiB answer is about 5.6 MB as base64, plus field
    names for up to 10,000 keys); ``rejected_body_bytes_max`` a body read before a local answer
    (None: as an HTTP/JSON body).
    """

    listen_port: int
    gateways: Sequence[tuple[str, int]]
    listen_host: str = "127.0.0.1"
    connect_timeout_ms: int = 1000
    request_timeout_ms: int = 30_000
    retries_max: int = 2
    rate_limit_tokens_max: int = 10_000
    rate_limit_tokens_per_fill: int = 10_000
    rate_limit_fill_interval_ms: int = 1000
    outlier_consecutive_failures: int = 5
    outlier_interval_ms: int = 5000
    outlier_base_ejection_ms: int = 10_000
    outlier_ejection_percent_max: int = 50
    panic_threshold_percent: float = 1.0
    health_check_interval_ms: int = 2000
    health_check_timeout_ms: int = 1000
    health_check_unhealthy_threshold: int = 3
    # Bodies read (and dropped) before a local 405 answer; None: ``http_json_request_bytes``.
    rejected_body_bytes_max: int | None = None
    extra_routes: Sequence[route_components_pb2.Route] = field(default_factory=tuple)
    # TLS on the listener (Envoy's certificate; ``ca_file`` verifies clients); None: plaintext.
    listener_tls: TlsFiles | None = None
    # Clients must present a certificate signed by ``listener_tls.ca_file`` (mTLS).
    require_client_cert: bool = True
    # mTLS from Envoy to the gateways (Envoy's client certificate; ``ca_file`` verifies the
    # gateways); None: plaintext h2c.
    upstream_tls: TlsFiles | None = None
    # Where Envoy finds its certificates by SDS (files written by :func:`write_sds_files`), so
    # that it picks up rotated files without a restart; "": the TLS contexts name the files
    # directly, and Envoy reads them once.
    sds_dir: str = ""
    http_json: bool = True
    grpc_request_bytes_max: int = GRPC_REQUEST_BYTES_MAX
    http_json_body_bytes_max: int | None = None
    http_json_response_bytes_max: int = 8 << 20
    # OpenTelemetry traces from Envoy; None: Envoy traces nothing.
    tracing: Tracing | None = None
    # Bearer tokens as an identity for clients without a certificate (needs ``listener_tls``);
    # None: a certificate is the only way in.
    jwt: Jwt | None = None

    @property
    def http_json_request_bytes(self) -> int:
        """The bound on one HTTP/JSON request body (``http_json_body_bytes_max`` or derived)."""
        if self.http_json_body_bytes_max is not None:
            return self.http_json_body_bytes_max
        return http_json_bytes_max(self.grpc_request_bytes_max)

    @property
    def rejected_body_bytes(self) -> int:
        """The bound on a body read before a local answer."""
        if self.rejected_body_bytes_max is not None:
            return self.rejected_body_bytes_max
        return self.http_json_request_bytes


def _ms(milliseconds: int) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMilliseconds(milliseconds)
    return d


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _socket_address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def _http2_upstream() -> dict[str, any_pb2.Any]:
    """``typed_extension_protocol_options`` making a cluster speak HTTP/2 (gRPC) upstream."""
    options = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=core_protocol_pb2.Http2ProtocolOptions()
        )
    )
    return {_HTTP_PROTOCOL_OPTIONS_KEY: _pack(options)}


def _common_tls(files: TlsFiles, alpn: Sequence[str]) -> tls_pb2.CommonTlsContext:
    def source(path: str) -> base_pb2.DataSource:
        return base_pb2.DataSource(filename=path)

    return tls_pb2.CommonTlsContext(
        tls_certificates=[
            tls_common_pb2.TlsCertificate(
                certificate_chain=source(files.cert_file), private_key=source(files.key_file)
            )
        ],
        validation_context=tls_common_pb2.CertificateValidationContext(
            trusted_ca=source(files.ca_file)
        ),
        alpn_protocols=list(alpn),
    )


FRONT_DOOR_SECRET = "dkv_front_door"
UPSTREAM_SECRET = "dkv_upstream"
ADS_SECRET = "dkv_ads"


def _sds_config(sds_dir: str, name: str) -> secret_pb2.SdsSecretConfig:
    """Secret ``name`` from its file in ``sds_dir`` (file-based SDS): Envoy reads the file
    again when something is moved into the directory (``watched_directory``)."""
    return secret_pb2.SdsSecretConfig(
        name=name,
        sds_config=config_source_pb2.ConfigSource(
            path_config_source=config_source_pb2.PathConfigSource(
                path=os.path.join(sds_dir, f"{name}.json"),
                watched_directory=base_pb2.WatchedDirectory(path=sds_dir),
            ),
            resource_api_version=config_source_pb2.V3,
        ),
    )


def _sds_tls(alpn: Sequence[str], sds_dir: str, name: str) -> tls_pb2.CommonTlsContext:
    """A TLS context whose certificate (``<name>_cert``) and CA (``<name>_ca``) come by SDS.
    The CA goes in ``combined_validation_context`` so that static checks (subject alt name
    matchers) can sit beside it in ``default_validation_context``."""
    return tls_pb2.CommonTlsContext(
        tls_certificate_sds_secret_configs=[_sds_config(sds_dir, f"{name}_cert")],
        combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=tls_common_pb2.CertificateValidationContext(),
            validation_context_sds_secret_config=_sds_config(sds_dir, f"{name}_ca"),
        ),
        alpn_protocols=list(alpn),
    )


def _tls_context(
    door: FrontDoor, files: TlsFiles, alpn: Sequence[str], name: str
) -> tls_pb2.CommonTlsContext:
    """By SDS when ``door.sds_dir`` is set (the secrets name ``files``), else the files."""
    if door.sds_dir:
        return _sds_tls(alpn, door.sds_dir, name)
    return _common_tls(files, alpn)


def _secrets(files: TlsFiles, name: str) -> list[secret_pb2.Secret]:
    """The two secrets of ``files``: they name the PEM files, which Envoy reads -- and reads
    again when something is moved into their directory (``watched_directory``: an
    ``os.replace``, or the swap of a Kubernetes Secret volume's ``..data`` symlink, which no
    watch on the file names themselves would see). A key that does not match its
    certificate (caught between two writes) is refused and the previous pair kept."""
    cert_dir = os.path.dirname(os.path.abspath(files.cert_file))
    key_dir = os.path.dirname(os.path.abspath(files.key_file))
    certificate = tls_common_pb2.TlsCertificate(
        certificate_chain=base_pb2.DataSource(filename=files.cert_file),
        private_key=base_pb2.DataSource(filename=files.key_file),
    )
    if cert_dir == key_dir:
        # One watch for the pair: Envoy reads both together after a change.
        certificate.watched_directory.path = cert_dir
    validation = tls_common_pb2.CertificateValidationContext(
        trusted_ca=base_pb2.DataSource(filename=files.ca_file),
        watched_directory=base_pb2.WatchedDirectory(
            path=os.path.dirname(os.path.abspath(files.ca_file))
        ),
    )
    return [
        secret_pb2.Secret(name=f"{name}_cert", tls_certificate=certificate),
        secret_pb2.Secret(name=f"{name}_ca", validation_context=validation),
    ]


def sds_secrets(door: FrontDoor) -> list[secret_pb2.Secret]:
    """Every secret the resources of ``door`` ask for by SDS (none without ``sds_dir``)."""
    if not door.sds_dir:
        return []
    out: list[secret_pb2.Secret] = []
    if door.listener_tls is not None:
        out += _secrets(door.listener_tls, FRONT_DOOR_SECRET)
    if door.upstream_tls is not None:
        out += _secrets(door.upstream_tls, UPSTREAM_SECRET)
    return out


def sds_file(secret: secret_pb2.Secret) -> str:
    """One secret as the file file-based SDS reads: a discovery response with one resource."""
    response = discovery_pb2.DiscoveryResponse(resources=[_pack(secret)])
    as_dict = json_format.MessageToDict(response, preserving_proto_field_name=True)
    return json.dumps(as_dict, indent=2, sort_keys=True) + "\n"


def write_sds_files(door: FrontDoor) -> list[str]:
    """Write the SDS files of ``door`` into ``door.sds_dir`` (:func:`write_secrets`)."""
    return write_secrets(door.sds_dir, sds_secrets(door))


def write_ads_sds_files(sds_dir: str, ads_tls: TlsFiles) -> list[str]:
    """Write the SDS files of :func:`bootstrap`'s ``ads_tls`` into ``sds_dir``."""
    return write_secrets(sds_dir, _secrets(ads_tls, ADS_SECRET))


def write_secrets(sds_dir: str, secrets: Sequence[secret_pb2.Secret]) -> list[str]:
    """Write one SDS file per secret into ``sds_dir`` (created if needed), each atomically
    (Envoy watches the directory for moves) and only when its content changed; returns the
    paths written."""
    written: list[str] = []
    if secrets:
        os.makedirs(sds_dir, exist_ok=True)
    for secret in secrets:
        path = os.path.join(sds_dir, f"{secret.name}.json")
        text = sds_file(secret)
        try:
            with open(path, encoding="utf-8") as f:
                if f.read() == text:
                    continue
        except OSError:
            pass
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
        written.append(path)
    return written


def _transport_socket(context: Any) -> base_pb2.TransportSocket:
    return base_pb2.TransportSocket(name=_TLS_NAME, typed_config=_pack(context))


def _static_cluster(
    name: str, endpoints: Sequence[tuple[str, int]], connect_timeout_ms: int
) -> cluster_pb2.Cluster:
    lb_endpoints = [
        endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(address=_socket_address(host, port))
        )
        for host, port in endpoints
    ]
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=_ms(connect_timeout_ms),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=lb_endpoints)],
        ),
        typed_extension_protocol_options=_http2_upstream(),
    )


def _u32(value: int) -> wrappers_pb2.UInt32Value:
    return wrappers_pb2.UInt32Value(value=value)


def gateway_cluster(door: FrontDoor) -> cluster_pb2.Cluster:
    """The cluster ``dkv_gateway``: the gateway replicas, HTTP/2, health checks, outlier
    detection on local-origin failures only, panic only when none is left (module docstring)."""
    if not door.gateways:
        raise ValueError("FrontDoor.gateways must name at least one gateway")
    cluster = _static_cluster(GATEWAY_CLUSTER_NAME, door.gateways, door.connect_timeout_ms)
    cluster.common_lb_config.CopyFrom(
        cluster_pb2.Cluster.CommonLbConfig(
            healthy_panic_threshold=percent_pb2.Percent(value=door.panic_threshold_percent)
        )
    )
    never = _u32(0)
    cluster.outlier_detection.CopyFrom(
        outlier_detection_pb2.OutlierDetection(
            split_external_local_origin_errors=True,
            consecutive_local_origin_failure=_u32(door.outlier_consecutive_failures),
            enforcing_consecutive_local_origin_failure=_u32(100),
            # Statuses are answers to one caller, not signs of a sick gateway.
            enforcing_consecutive_5xx=never,
            enforcing_consecutive_gateway_failure=never,
            enforcing_success_rate=never,
            enforcing_local_origin_success_rate=never,
            enforcing_failure_percentage=never,
            enforcing_failure_percentage_local_origin=never,
            interval=_ms(door.outlier_interval_ms),
            base_ejection_time=_ms(door.outlier_base_ejection_ms),
            max_ejection_percent=_u32(door.outlier_ejection_percent_max),
        )
    )
    cluster.health_checks.append(
        health_check_pb2.HealthCheck(
            timeout=_ms(door.health_check_timeout_ms),
            interval=_ms(door.health_check_interval_ms),
            # Envoy checks a cluster that has had no traffic yet only every 60 s by default,
            # and keeps that timer after traffic starts: a gateway checked before it had its
            # cluster map (NOT_SERVING) stayed "failed" for a minute.
            no_traffic_interval=_ms(door.health_check_interval_ms),
            no_traffic_healthy_interval=_ms(door.health_check_interval_ms),
            unhealthy_threshold=_u32(door.health_check_unhealthy_threshold),
            healthy_threshold=_u32(1),
            grpc_health_check=health_check_pb2.HealthCheck.GrpcHealthCheck(service_name=KV_SERVICE),
        )
    )
    if door.upstream_tls is not None:
        # HTTP/2 only (Python gRPC servers need it), negotiated by ALPN.
        cluster.transport_socket.CopyFrom(
            _transport_socket(
                tls_pb2.UpstreamTlsContext(
                    common_tls_context=_tls_context(
                        door, door.upstream_tls, ["h2"], UPSTREAM_SECRET
                    )
                )
            )
        )
    return cluster


def _retry_policy(retry_on: str, retries_max: int) -> route_components_pb2.RetryPolicy:
    return route_components_pb2.RetryPolicy(
        retry_on=retry_on,
        num_retries=wrappers_pb2.UInt32Value(value=retries_max),
        retry_back_off=route_components_pb2.RetryPolicy.RetryBackOff(
            base_interval=_ms(25), max_interval=_ms(250)
        ),
    )


GRPC_CONTENT_TYPE = "application/grpc"


def _grpc_only() -> route_components_pb2.HeaderMatcher:
    """Matches gRPC requests (``application/grpc``, ``application/grpc+proto``)."""
    return route_components_pb2.HeaderMatcher(
        name="content-type", string_match=string_pb2.StringMatcher(prefix=GRPC_CONTENT_TYPE)
    )


def _route(
    door: FrontDoor, *, path: str | None = None, prefix: str | None = None, retry_on: str | None
) -> route_components_pb2.Route:
    match = (
        route_components_pb2.RouteMatch(path=path, headers=[_grpc_only()])
        if path is not None
        else route_components_pb2.RouteMatch(prefix=prefix or "/", headers=[_grpc_only()])
    )
    action = route_components_pb2.RouteAction(
        cluster=GATEWAY_CLUSTER_NAME,
        # The bound for calls whose client set no deadline. A client's grpc-timeout is
        # passed on to the gateway, not enforced here (module docstring).
        timeout=_ms(door.request_timeout_ms),
    )
    if retry_on is not None and door.retries_max > 0:
        action.retry_policy.CopyFrom(_retry_policy(retry_on, door.retries_max))
    route = route_components_pb2.Route(match=match, route=action)
    # The request whole, at most one message of grpc_request_bytes_max: past it Envoy answers
    # 413 (RESOURCE_EXHAUSTED to gRPC, _local_replies) and nothing reaches a gateway. Requests
    # are unary (a Watch too: one request, a stream of answers), so holding one costs nothing.
    _buffer(route, door.grpc_request_bytes_max + GRPC_FRAME_PREFIX_BYTES)
    return route


def _buffer(route: route_components_pb2.Route, max_request_bytes: int) -> None:
    """Enable the buffer filter (off at the connection manager) on ``route``."""
    route.typed_per_filter_config[_BUFFER_NAME].CopyFrom(
        _pack(
            buffer_pb2.BufferPerRoute(
                buffer=buffer_pb2.Buffer(max_request_bytes=_u32(max_request_bytes))
            )
        )
    )


def _routes(door: FrontDoor) -> list[route_components_pb2.Route]:
    watch = _route(door, path=f"{KV_SERVICE_PREFIX}Watch", retry_on=None)
    watch.route.timeout.CopyFrom(_ms(0))  # a stream lives as long as the client wants
    # A watch may see no event for hours; Envoy's default stream idle timeout (5 min) would
    # cut it. Dead peers are found by HTTP/2 keepalive instead.
    watch.route.idle_timeout.CopyFrom(_ms(0))
    return [
        _route(door, path=f"{KV_SERVICE_PREFIX}Range", retry_on=READ_RETRY_ON),
        _route(door, path=f"{KV_SERVICE_PREFIX}Put", retry_on=WRITE_RETRY_ON),
        _route(door, path=f"{KV_SERVICE_PREFIX}Delete", retry_on=WRITE_RETRY_ON),
        watch,
        *door.extra_routes,
        # Any other KV method: treat it as a write.
        _route(door, prefix=KV_SERVICE_PREFIX, retry_on=WRITE_RETRY_ON),
        # The gateway's own health (SERVING once it has a cluster map): a client may ask.
        _route(door, prefix=f"/{HEALTH_SERVICE}/", retry_on=READ_RETRY_ON),
        # The whole cluster's health (dkvctl status), answered by the gateway.
        _route(door, prefix=f"/{CLUSTER_SERVICE}/", retry_on=READ_RETRY_ON),
        *_refusals(door),
    ]


HEALTH_SERVICE = "grpc.health.v1.Health"
CLUSTER_SERVICE = "dkv.v1.Cluster"
ELSEWHERE = {
    "dkv.v1.Admin": "each node's client port (dkvctl --endpoints NODE_HOST:PORT member, "
    "leader, snapshot; dkvctl status works through the front door)",
    "dkv.v1.Membership": "the membership service's client port "
    "(dkvctl cluster --membership HOST:PORT ...)",
    "dkv.v1.RaftPeer": "the nodes' peer ports, to other nodes only",
}
"""Services of dkv the front door does not route, and where they are served."""
HTTP_JSON_METHODS = (
    # (path match, as a user reads it, allowed methods), as kv.proto's google.api.http binds.
    (("path", "/v1/kv"), "/v1/kv", ("GET",)),
    (("prefix", "/v1/kv/"), "/v1/kv/{key}", ("GET", "PUT", "DELETE")),
    (("path", "/v1/kv:range"), "/v1/kv:range", ("POST",)),
    (("path", "/v1/kv:put"), "/v1/kv:put", ("POST",)),
    (("path", "/v1/kv:delete"), "/v1/kv:delete", ("POST",)),
    (("path", "/v1/kv:watch"), "/v1/kv:watch", ("GET", "POST")),
)


def _direct(
    door: FrontDoor,
    match: route_components_pb2.RouteMatch,
    status: int,
    body: str,
    headers: Sequence[tuple[str, str]] = (),
) -> route_components_pb2.Route:
    """A route Envoy answers itself, after reading the request body (the buffer filter):
    answering while a client still uploads ends in an HTTP/2 stream error at the client.
    To a gRPC request Envoy's local reply is a gRPC status (404 -> UNIMPLEMENTED, 415 ->
    INTERNAL) whose message is ``body``."""
    route = route_components_pb2.Route(
        match=match,
        direct_response=route_components_pb2.DirectResponseAction(
            status=status, body=base_pb2.DataSource(inline_string=body + "\n")
        ),
        response_headers_to_add=[
            base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v))
            for k, v in headers
        ],
    )
    _buffer(route, door.rejected_body_bytes)
    return route


def _refusals(door: FrontDoor) -> list[route_components_pb2.Route]:
    """Local answers for everything the routes above do not take (module docstring)."""
    routes = [
        _direct(
            door,
            route_components_pb2.RouteMatch(prefix=f"/{service}/"),
            404,
            f"{service} is not served by the front door: it is served by {where}",
        )
        for service, where in ELSEWHERE.items()
    ]
    routes.append(
        _direct(
            door,
            route_components_pb2.RouteMatch(prefix=KV_SERVICE_PREFIX),
            415,
            f"{KV_SERVICE} methods take content-type {GRPC_CONTENT_TYPE}; HTTP/JSON clients "
            "use /v1/kv (docs/http.md)",
        )
    )
    if door.http_json:
        for (kind, value), shown, methods in HTTP_JSON_METHODS:
            # Only the methods it does not take: a matching method the transcoder could not
            # map (e.g. an empty key) falls through to the 404 below.
            not_allowed = route_components_pb2.HeaderMatcher(
                name=":method",
                string_match=string_pb2.StringMatcher(
                    safe_regex=regex_pb2.RegexMatcher(regex="|".join(methods))
                ),
                invert_match=True,
            )
            match = route_components_pb2.RouteMatch(headers=[not_allowed], **{kind: value})
            allow = ", ".join(methods)
            routes.append(
                _direct(
                    door,
                    match,
                    405,
                    f"{shown} takes {allow}",
                    headers=[("allow", allow)],
                )
            )
    routes.append(
        _direct(
            door,
            route_components_pb2.RouteMatch(prefix="/", headers=[_grpc_only()]),
            404,
            f"unknown service: the front door serves {KV_SERVICE} and {HEALTH_SERVICE}",
        )
    )
    routes.append(
        _direct(
            door,
            route_components_pb2.RouteMatch(prefix="/"),
            404,
            "not found: the HTTP/JSON API is under /v1/kv (docs/http.md)"
            if door.http_json
            else "not found: this front door serves gRPC only",
        )
    )
    return routes


def _full_percent() -> base_pb2.RuntimeFractionalPercent:
    return base_pb2.RuntimeFractionalPercent(
        default_value=percent_pb2.FractionalPercent(
            numerator=100, denominator=percent_pb2.FractionalPercent.HUNDRED
        )
    )


def _local_rate_limit(door: FrontDoor) -> hcm_pb2.HttpFilter:
    config = local_rate_limit_pb2.LocalRateLimit(
        stat_prefix="dkv_local_rate_limit",
        token_bucket=token_bucket_pb2.TokenBucket(
            max_tokens=door.rate_limit_tokens_max,
            tokens_per_fill=wrappers_pb2.UInt32Value(value=door.rate_limit_tokens_per_fill),
            fill_interval=_ms(door.rate_limit_fill_interval_ms),
        ),
        # Without these two at 100% the filter does nothing (FIELD-NOTES).
        filter_enabled=_full_percent(),
        filter_enforced=_full_percent(),
        rate_limited_as_resource_exhausted=True,
    )
    return hcm_pb2.HttpFilter(name=_LOCAL_RATE_LIMIT_NAME, typed_config=_pack(config))


@functools.cache
def kv_descriptor_set() -> bytes:
    """The serialized ``FileDescriptorSet`` the transcoder needs (package data, read once)."""
    return importlib.resources.files("dkv_gateway").joinpath(DESCRIPTOR_SET_RESOURCE).read_bytes()


def grpc_json_transcoder(door: FrontDoor) -> hcm_pb2.HttpFilter:
    """The gRPC-JSON transcoder for ``dkv.v1.KV``, configured for curl users (docs/http.md).

    - ``preserve_proto_field_names``/``always_print_primitive_fields``: answers use the names of
      kv.proto and show zero values (``"succeeded": false`` says more than a missing field).
    - ``stream_newline_delimited``: a Watch answer is one JSON object per line, which a client
      can act on as it arrives, instead of one JSON array that never closes.
    - ``convert_grpc_status``: a gRPC error becomes its HTTP status with ``{"code", "message"}``.
    - ``request_validation_options``: unknown query parameters and a body field that collides
      with a path binding are 400s, not silently dropped.
    - ``url_unescape_spec: ALL_CHARACTERS``: path variables are base64 (bytes fields), and
      standard base64 has ``+``, ``/`` and ``=``; decoding every percent-escape lets a client
      percent-encode a key from a JSON answer as any URL library would.
    """
    options = transcoder_pb2.GrpcJsonTranscoder
    config = options(
        proto_descriptor_bin=kv_descriptor_set(),
        services=[KV_SERVICE],
        print_options=options.PrintOptions(
            always_print_primitive_fields=True,
            preserve_proto_field_names=True,
            stream_newline_delimited=True,
        ),
        convert_grpc_status=True,
        url_unescape_spec=options.ALL_CHARACTERS,
        request_validation_options=options.RequestValidationOptions(
            reject_unknown_query_parameters=True,
            reject_binding_body_field_collisions=True,
        ),
        max_request_body_size=_u32(door.http_json_request_bytes),
        max_response_body_size=_u32(door.http_json_response_bytes_max),
    )
    return hcm_pb2.HttpFilter(name=_TRANSCODER_NAME, typed_config=_pack(config))


def _local_replies(door: FrontDoor) -> hcm_pb2.LocalReplyConfig:
    """Envoy's own 413 (a body over a limit: the transcoder's, the buffer filter's) names the
    limits; to a gRPC request it is RESOURCE_EXHAUSTED, which gRPC clients do not retry and
    which says "too much" (Envoy's mapping of 413 is UNKNOWN). The body becomes the gRPC
    status message; an HTTP client gets it as plain text, like Envoy's other refusals.

    A transcoded request looks like gRPC by then (the transcoder rewrote its content type)
    but is answered as HTTP: it is told apart by ``x-envoy-original-path``, which the
    transcoder sets."""
    too_large = accesslog_pb2.AccessLogFilter(
        status_code_filter=accesslog_pb2.StatusCodeFilter(
            comparison=accesslog_pb2.ComparisonFilter(
                op=accesslog_pb2.ComparisonFilter.EQ,
                value=base_pb2.RuntimeUInt32(
                    default_value=413, runtime_key="dkv.front_door.too_large_status"
                ),
            )
        )
    )
    grpc_request = accesslog_pb2.AccessLogFilter(
        header_filter=accesslog_pb2.HeaderFilter(header=_grpc_only())
    )
    not_transcoded = accesslog_pb2.AccessLogFilter(
        header_filter=accesslog_pb2.HeaderFilter(
            header=route_components_pb2.HeaderMatcher(
                name="x-envoy-original-path", present_match=False
            )
        )
    )
    grpc_limit = f"gRPC request messages of at most {door.grpc_request_bytes_max} bytes"
    json_limit = (
        f"HTTP/JSON request bodies of at most {door.http_json_request_bytes} bytes, carrying "
        f"a request of at most {door.grpc_request_bytes_max} bytes as protobuf"
        if door.http_json
        else ""
    )
    return hcm_pb2.LocalReplyConfig(
        mappers=[
            hcm_pb2.ResponseMapper(
                filter=accesslog_pb2.AccessLogFilter(
                    and_filter=accesslog_pb2.AndFilter(
                        filters=[too_large, grpc_request, not_transcoded]
                    )
                ),
                headers_to_add=[
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(
                            key="grpc-status",
                            value="8",  # RESOURCE_EXHAUSTED
                        ),
                        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                    )
                ],
                body=base_pb2.DataSource(
                    inline_string="request message too large: the front door takes "
                    f"{grpc_limit} (docs/http.md)"
                ),
            ),
            hcm_pb2.ResponseMapper(
                filter=too_large,
                body=base_pb2.DataSource(
                    inline_string="request body too large: the front door takes "
                    + (json_limit or grpc_limit)
                    + " (docs/http.md)\n"
                ),
            ),
        ]
    )


def _jwt_filters(jwt: Jwt) -> list[hcm_pb2.HttpFilter]:
    """A client's own :data:`SUBJECT_HEADER` removed, then ``jwt_authn``: a token, if any, must
    be good; its ``sub`` is set in that header and the token itself is not forwarded.

    ``jwt_authn`` itself also clears its ``claim_to_headers`` headers on every request (seen
    with Envoy 1.40: without the header mutation a forged header still did not get through);
    the explicit removal keeps dkv from depending on that."""
    sanitize = header_mutation_pb2.HeaderMutation(
        mutations=header_mutation_pb2.Mutations(
            request_mutations=[mutation_rules_pb2.HeaderMutation(remove=SUBJECT_HEADER)]
        )
    )
    lifetime = duration_pb2.Duration(seconds=TTL_S_MAX)
    provider = jwt_authn_pb2.JwtProvider(
        issuer=jwt.issuer,
        audiences=[jwt.audience],
        require_expiration=True,
        max_lifetime=lifetime,
        local_jwks=base_pb2.DataSource(filename=jwt.jwks_file),
        forward=False,
        claim_to_headers=[
            jwt_authn_pb2.JwtClaimToHeader(header_name=SUBJECT_HEADER, claim_name="sub")
        ],
    )
    token_if_any = jwt_authn_pb2.JwtRequirement(
        requires_any=jwt_authn_pb2.JwtRequirementOrList(
            requirements=[
                jwt_authn_pb2.JwtRequirement(provider_name=JWT_PROVIDER_NAME),
                jwt_authn_pb2.JwtRequirement(allow_missing=empty_pb2.Empty()),
            ]
        )
    )
    authn = jwt_authn_pb2.JwtAuthentication(
        providers={JWT_PROVIDER_NAME: provider},
        rules=[
            jwt_authn_pb2.RequirementRule(
                match=route_components_pb2.RouteMatch(prefix="/"), requires=token_if_any
            )
        ],
    )
    return [
        hcm_pb2.HttpFilter(name=_HEADER_MUTATION_NAME, typed_config=_pack(sanitize)),
        hcm_pb2.HttpFilter(name=_JWT_AUTHN_NAME, typed_config=_pack(authn)),
    ]


def _http_filters(door: FrontDoor) -> list[hcm_pb2.HttpFilter]:
    """Rate limit first (HTTP/JSON and gRPC share the budget; bad tokens too), bearer tokens
    (``door.jwt``), transcoder, the buffer (off except on the routes Envoy answers itself:
    streams must not be buffered), router last."""
    filters = [_local_rate_limit(door)]
    if door.jwt is not None:
        filters += _jwt_filters(door.jwt)
    if door.http_json:
        filters.append(grpc_json_transcoder(door))
    filters.append(
        hcm_pb2.HttpFilter(
            name=_BUFFER_NAME,
            typed_config=_pack(buffer_pb2.Buffer(max_request_bytes=_u32(door.rejected_body_bytes))),
            disabled=True,
        )
    )
    filters.append(hcm_pb2.HttpFilter(name=_ROUTER_NAME, typed_config=_pack(router_pb2.Router())))
    return filters


def listener(door: FrontDoor) -> listener_pb2.Listener:
    """The front-door listener: HTTP connection manager, inline routes, rate limit, bearer
    tokens (``jwt``), transcoder (unless ``http_json`` is off), router."""
    if door.jwt is not None and door.listener_tls is None:
        raise InvalidArgument("bearer tokens need a TLS front door: they would travel in clear")
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix="dkv_ingress",
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        route_config=route_pb2.RouteConfiguration(
            name="dkv_routes",
            virtual_hosts=[
                route_components_pb2.VirtualHost(name="dkv", domains=["*"], routes=_routes(door))
            ],
        ),
        http_filters=_http_filters(door),
        local_reply_config=_local_replies(door),
    )
    if door.tracing is not None:
        manager.tracing.CopyFrom(_tracing(door.tracing))
    if door.listener_tls is not None:
        # The client Envoy verified, for the gateway's authorization: a header the client
        # sent is dropped (SANITIZE_SET) and replaced by the certificate's URI and subject.
        manager.forward_client_cert_details = hcm_pb2.HttpConnectionManager.SANITIZE_SET
        manager.set_current_client_cert_details.CopyFrom(
            hcm_pb2.HttpConnectionManager.SetCurrentClientCertDetails(
                uri=True, subject=wrappers_pb2.BoolValue(value=True)
            )
        )
    else:
        # A plaintext front door has no client to describe: never pass a client's own on.
        manager.forward_client_cert_details = hcm_pb2.HttpConnectionManager.SANITIZE
    return listener_pb2.Listener(
        name=LISTENER_NAME,
        address=_socket_address(door.listen_host, door.listen_port),
        filter_chains=[_filter_chain(door, manager)],
    )


def _filter_chain(
    door: FrontDoor, manager: hcm_pb2.HttpConnectionManager
) -> listener_components_pb2.FilterChain:
    chain = listener_components_pb2.FilterChain(
        filters=[listener_components_pb2.Filter(name=_HCM_NAME, typed_config=_pack(manager))]
    )
    if door.listener_tls is not None:
        # gRPC negotiates h2, curl and browsers may take http/1.1: both share the listener.
        context = tls_pb2.DownstreamTlsContext(
            common_tls_context=_tls_context(
                door, door.listener_tls, ["h2", "http/1.1"], FRONT_DOOR_SECRET
            ),
            # With bearer tokens, a client may come without a certificate (the gateway refuses
            # a request that has neither); one that is presented is verified all the same.
            require_client_certificate=wrappers_pb2.BoolValue(
                value=door.require_client_cert and door.jwt is None
            ),
        )
        chain.transport_socket.CopyFrom(_transport_socket(context))
    return chain


def _tracing(t: Tracing) -> hcm_pb2.HttpConnectionManager.Tracing:
    """Envoy's OpenTelemetry tracer, exporting to :data:`OTLP_CLUSTER_NAME`."""
    config = opentelemetry_pb2.OpenTelemetryConfig(
        grpc_service=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=OTLP_CLUSTER_NAME)
        ),
        service_name=ENVOY_SERVICE_NAME,
    )
    return hcm_pb2.HttpConnectionManager.Tracing(
        provider=http_tracer_pb2.Tracing.Http(
            name=_OPENTELEMETRY_TRACER_NAME, typed_config=_pack(config)
        ),
        random_sampling=percent_pb2.Percent(value=t.sample_percent),
    )


def otlp_cluster(t: Tracing, connect_timeout_ms: int) -> cluster_pb2.Cluster:
    """The OTLP receiver Envoy exports its spans to (HTTP/2: OTLP/gRPC)."""
    return _static_cluster(OTLP_CLUSTER_NAME, [(t.otlp_host, t.otlp_port)], connect_timeout_ms)


def resources(door: FrontDoor) -> tuple[list[cluster_pb2.Cluster], list[listener_pb2.Listener]]:
    """Everything Envoy needs for ``door``: ``(clusters, listeners)``, as ADS serves them."""
    clusters = [gateway_cluster(door)]
    if door.tracing is not None:
        clusters.append(otlp_cluster(door.tracing, door.connect_timeout_ms))
    return clusters, [listener(door)]


DOWNSTREAM_CONNECTIONS_MAX = 10_000
"""Client connections one Envoy accepts at once (beyond them, new ones are refused): a bound
on what a flood of connections can cost, and Envoy warns at start without one."""


def bootstrap(
    *,
    ads_host: str,
    ads_port: int,
    admin_port: int,
    node_id: str = "dkv-envoy",
    node_cluster: str = "dkv",
    admin_host: str = "127.0.0.1",
    connect_timeout_ms: int = 1000,
    downstream_connections_max: int = DOWNSTREAM_CONNECTIONS_MAX,
    ads_tls: TlsFiles | None = None,
    sds_dir: str = "",
    trust_domain: str = "dkv",
    stats_port: int | None = None,
    stats_host: str = "0.0.0.0",
) -> bootstrap_pb2.Bootstrap:
    """Envoy's bootstrap: the admin endpoint, the ADS server and the limit on client
    connections, nothing else.

    ``ads_config`` alone does nothing: CDS and LDS must also say ``ads: {}`` (FIELD-NOTES).
    ``ads_tls``: Envoy's certificate, key and CA: the gateway's xDS port speaks mTLS and serves
    only Envoy's identity, and Envoy accepts only the gateway's (``spiffe://.../gateway``).
    The admin interface stays on ``admin_host`` (loopback): it can change Envoy's state.
    ``sds_dir``: ``ads_tls`` comes by file-based SDS from there (:func:`write_ads_sds_files`),
    so that Envoy's xDS connection follows rotated certificates like its listener does.
    ``stats_port``: a listener on ``stats_host:stats_port`` that serves Envoy's
    ``/stats/prometheus`` and nothing else (:func:`stats_listener`), for a Prometheus that
    cannot reach the admin interface on loopback (a pod's); None: none.
    """
    connections = overload_pb2.ResourceMonitor(
        name="envoy.resource_monitors.global_downstream_max_connections",
        typed_config=_pack(
            downstream_connections_pb2.DownstreamConnectionsConfig(
                max_active_downstream_connections=downstream_connections_max
            )
        ),
    )
    ads_source = config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )
    clusters = [
        _ads_cluster(
            ads_host,
            ads_port,
            connect_timeout_ms,
            ads_tls,
            sds_dir,
            f"spiffe://{trust_domain}/gateway",
        )
    ]
    listeners: list[listener_pb2.Listener] = []
    if stats_port is not None:
        clusters.append(admin_cluster(admin_host, admin_port, connect_timeout_ms))
        listeners.append(stats_listener(stats_host, stats_port))
    return bootstrap_pb2.Bootstrap(
        node=base_pb2.Node(id=node_id, cluster=node_cluster),
        admin=bootstrap_pb2.Admin(address=_socket_address(admin_host, admin_port)),
        dynamic_resources=bootstrap_pb2.Bootstrap.DynamicResources(
            ads_config=config_source_pb2.ApiConfigSource(
                api_type=config_source_pb2.ApiConfigSource.GRPC,
                transport_api_version=config_source_pb2.V3,
                set_node_on_first_message_only=True,
                grpc_services=[
                    grpc_service_pb2.GrpcService(
                        envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(
                            cluster_name=ADS_CLUSTER_NAME
                        )
                    )
                ],
            ),
            cds_config=ads_source,
            lds_config=ads_source,
        ),
        static_resources=bootstrap_pb2.Bootstrap.StaticResources(
            clusters=clusters, listeners=listeners
        ),
        overload_manager=overload_pb2.OverloadManager(resource_monitors=[connections]),
    )


ADMIN_CLUSTER_NAME = "dkv_envoy_admin"
STATS_LISTENER_NAME = "dkv_envoy_stats"
STATS_PATH = "/stats/prometheus"


def admin_cluster(host: str, port: int, connect_timeout_ms: int) -> cluster_pb2.Cluster:
    """Envoy's own admin interface as an upstream (HTTP/1.1: the admin server speaks it)."""
    cluster = _static_cluster(ADMIN_CLUSTER_NAME, [(host, port)], connect_timeout_ms)
    del cluster.typed_extension_protocol_options[_HTTP_PROTOCOL_OPTIONS_KEY]
    return cluster


def stats_listener(host: str, port: int) -> listener_pb2.Listener:
    """A plaintext listener that passes ``GET /stats/prometheus`` to the admin interface and
    answers 404 to anything else: the admin interface can change Envoy's state, so it stays
    on loopback and only its metrics are exposed."""
    routes = [
        route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(path=STATS_PATH),
            route=route_components_pb2.RouteAction(cluster=ADMIN_CLUSTER_NAME),
        ),
        route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(prefix="/"),
            direct_response=route_components_pb2.DirectResponseAction(
                status=404,
                body=base_pb2.DataSource(inline_string=f"only {STATS_PATH} is served here\n"),
            ),
        ),
    ]
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix="dkv_envoy_stats",
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        route_config=route_pb2.RouteConfiguration(
            name="dkv_envoy_stats",
            virtual_hosts=[
                route_components_pb2.VirtualHost(name="stats", domains=["*"], routes=routes)
            ],
        ),
        http_filters=[
            hcm_pb2.HttpFilter(name=_ROUTER_NAME, typed_config=_pack(router_pb2.Router()))
        ],
    )
    return listener_pb2.Listener(
        name=STATS_LISTENER_NAME,
        address=_socket_address(host, port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(name=_HCM_NAME, typed_config=_pack(manager))
                ]
            )
        ],
    )


def _ads_cluster(
    host: str,
    port: int,
    connect_timeout_ms: int,
    tls: TlsFiles | None,
    sds_dir: str = "",
    gateway_id: str = GATEWAY_SPIFFE_ID,
) -> cluster_pb2.Cluster:
    cluster = _static_cluster(ADS_CLUSTER_NAME, [(host, port)], connect_timeout_ms)
    if tls is not None:
        common = _sds_tls(["h2"], sds_dir, ADS_SECRET) if sds_dir else _common_tls(tls, ["h2"])
        context = tls_pb2.UpstreamTlsContext(common_tls_context=common)
        _match_uri(context.common_tls_context, gateway_id)
        cluster.transport_socket.CopyFrom(_transport_socket(context))
    return cluster


def _match_uri(context: tls_pb2.CommonTlsContext, uri: str) -> None:
    """Accept only a peer certificate with this URI SAN (on top of the CA's signature)."""
    matcher = tls_common_pb2.SubjectAltNameMatcher(
        san_type=tls_common_pb2.SubjectAltNameMatcher.URI,
        matcher=string_pb2.StringMatcher(exact=uri),
    )
    if context.HasField("combined_validation_context"):
        # The CA comes by SDS: the matcher sits beside it (Envoy merges the two).
        validation = context.combined_validation_context.default_validation_context
    else:
        validation = context.validation_context
    validation.match_typed_subject_alt_names.append(matcher)


def bootstrap_json(config: bootstrap_pb2.Bootstrap) -> str:
    """The bootstrap as JSON (valid YAML too), the form Envoy's ``-c`` reads."""
    as_dict = json_format.MessageToDict(config, preserving_proto_field_name=True)
    return json.dumps(as_dict, indent=2, sort_keys=True) + "\n"


def write_bootstrap(path: str, config: bootstrap_pb2.Bootstrap) -> None:
    """Write ``config`` to ``path`` as JSON (use a ``.json`` or ``.yaml`` suffix)."""
    with open(path, "w", encoding="utf-8") as out:
        out.write(bootstrap_json(config))
