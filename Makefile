# dkv developer entry points. Every target that needs Python depends on `setup`,
# so a fresh clone needs nothing but python3 (>= 3.11) and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/dkv/v1/*.proto)

.PHONY: kube-up kube-build kube-down test-kube run setup test test-fast lint image proto proto-check bench-raft bench-node bench bench-telemetry bench-overheads bench-scale loadtest sim dashboards jaeger trace-backend etcd36 bench-etcd36 helm chart-helm chart-lint cert-manager-manifests clean help

help:
	@echo "make run         the whole platform on 127.0.0.1 (membership, 3 nodes, gateway, Envoy); Ctrl-C stops"
	@echo "make setup       create .venv and install dkv with its dev extras"
	@echo "make test        run the whole test suite (DKV_SIM_SEEDS=N scales the simulator)"
	@echo "make lint        ruff + mypy --strict on src/dkv, services/, grafana/, loadtests/ and bench/"
	@echo "make image       the one image (dkv:<version>) as an OCI archive in build/image/, without Docker (needs root, apt debootstrap umoci)"
	@echo "make proto       regenerate Python code and the gateway's descriptor set from protos/"
	@echo "make dashboards  regenerate the Grafana dashboards grafana/dashboards/*.json from grafana/dashboards.py"
	@echo "make bench-raft  Raft core throughput and checker timing (writes nothing; see docs/benchmarks.md)"
	@echo "make bench-node  3 dkv nodes vs 3 etcd members (3.6 when Go can build it, and 3.4) with h2load (needs apt nghttp2-client etcd-server etcd-client)"
	@echo "make bench       front door (Envoy) vs gateway vs leader vs etcd 3.6 and 3.4 with h2load (same apt packages)"
	@echo "make bench-telemetry  the cost of metrics (and tracing) through the front door (~4 min)"
	@echo "make bench-overheads  tracing, metrics and access checks per request and hop, in isolation (~10 s)"
	@echo "make bench-scale 1M keys loaded, snapshot catch-up, restart on a 1-GB data dir, 1/8/64 shards (DKV_BENCH_SCALE sizes it)"
	@echo "make loadtest    locust (gRPC and HTTP/JSON users) against make run's stack, 30 s; LOADTEST_ARGS=\"--help\" (docs/loadtests.md)"
	@echo "make sim SEED=n  replay one simulator seed verbosely"
	@echo "make jaeger      build the Jaeger v2 trace backend from its Go module once (~4 min cold; needs Go)"
	@echo "make etcd36      build etcd 3.6 (etcd, etcdctl) from its Go modules once, for the benchmarks (~1 min; needs Go)"
	@echo "make helm        build the Helm CLI (v4) from its Go module once, for the chart tests (~3 min cold; needs Go)"
	@echo "make chart-lint  helm lint --strict charts/dkv"
	@echo "make cert-manager-manifests  regenerate cert-manager/dkv-certificates.yaml from the chart"
	@echo "make kube-up     a real single-node Kubernetes on this machine (builds it once, ~10 min cold; needs root, Go, apt containerd runc containernetworking-plugins); kube/README.md"
	@echo "make kube-down   stop it and remove its state dir"
	@echo "make kube-build  build (and cache) what kube-up runs, start nothing"
	@echo "make test-kube   install charts/dkv on it (cert-manager on) and run the platform's tests against real pods"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# xds-protos overwrites opentelemetry-proto and google/api with stale copies (FIELD-NOTES):
	@# reinstall both, at the versions pip chose, as the last step.
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps \
	    "opentelemetry-proto==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-sdk"))')" \
	    "googleapis-common-protos==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("googleapis-common-protos"))')"
	touch $(STAMP)

setup: $(STAMP)

# Data, certificates and logs under ./.dkv (kept: running again resumes the same cluster).
run: setup trace-backend
	$(BIN)/dkv dev

test: setup trace-backend chart-helm
	$(BIN)/python -m pytest -n auto -q -m "not kube"

test-fast: setup
	$(BIN)/python -m pytest -q -m 'not slow and not kube'

lint: setup
	$(BIN)/ruff check src services tests grafana loadtests bench kube
	$(BIN)/ruff format --check src services tests grafana loadtests bench kube
	$(BIN)/mypy src/dkv services/node/dkv_node services/membership/dkv_membership services/gateway/dkv_gateway
	$(BIN)/mypy grafana/dashboards.py
	$(BIN)/mypy loadtests bench kube

# The one image of every process (Dockerfile), built without a Docker daemon: debootstrap, a
# virtualenv, umoci; base and layers cached under ${DKV_CACHE_DIR:-~/.cache/dkv}/image. Prints
# the archive's path (build/image/dkv-<version>.oci.tar); see image/README.md.
image: setup
	image/build.sh

# Generated code is committed so the package imports without protoc;
# tests/test_proto.py fails when it is stale. kv.proto imports google/api/annotations.proto,
# which googleapis-common-protos (a dependency) installs next to its Python modules. The
# descriptor set of kv.proto is the gRPC-JSON transcoder's input, package data of dkv_gateway.
GOOGLEAPIS_PROTOS = $(shell $(BIN)/python -c 'import pathlib, google.api.annotations_pb2 as m; print(pathlib.Path(m.__file__).parents[2])')
KV_DESCRIPTOR_SET := services/gateway/dkv_gateway/dkv_descriptor.pb

proto: setup
	$(BIN)/python -m grpc_tools.protoc -Iprotos -I$(GOOGLEAPIS_PROTOS) --python_out=src --pyi_out=src --grpc_python_out=src $(PROTO_SRC)
	$(BIN)/python -m grpc_tools.protoc -Iprotos -I$(GOOGLEAPIS_PROTOS) --include_imports --descriptor_set_out=$(KV_DESCRIPTOR_SET) protos/dkv/v1/kv.proto

bench-raft: setup
	$(BIN)/python -m bench.bench_raft

# Side by side with etcd 3.6 (when it could be built) and 3.4, driven by h2load;
# DKV_BENCH_SCALE=n runs each row n times longer, DKV_BENCH_PROFILE=1 adds a py-spy profile of
# the dkv leader (see docs/benchmarks.md).
bench-node: setup | bench-etcd36
	$(BIN)/python -m bench.bench_node

# Issue 12 "as the work grows": 1 million keys loaded (rows before/after), a new member caught
# up by snapshot, a kill -9 restart on a ~1-GB data dir with a long log, 1/8/64 shards and
# the idle CPU of 64 (~20 min at full size; DKV_BENCH_SCALE=0.05 for a small run).
bench-scale: setup
	$(BIN)/python -m bench.bench_scale

# The front door's cost: Envoy -> gateway -> leader, the gateway alone, the leader directly and
# etcd 3.6 and 3.4, one after the other (~3.5 min, ~1 min more with etcd 3.6);
# DKV_BENCH_PROFILE=1 adds a py-spy profile of the gateway.
bench: setup | bench-etcd36
	$(BIN)/python -m bench.bench_front_door

# Metrics off vs on (vs tracing at 0.01 where present), alternating rounds (see docs/benchmarks.md).
bench-telemetry: setup
	$(BIN)/python -m bench.bench_telemetry

# Per request and hop, in isolation: spans, the unsampled fast path, metrics, access checks.
bench-overheads: setup
	$(BIN)/python -m bench.bench_overheads

# Locust against a running front door (make run's by default: start it first), headless and
# bounded; reports in .dkv/loadtest/<run>/. LOADTEST_ARGS adds flags, e.g.
# LOADTEST_ARGS="--run-time 2m --users 32 --distribution zipf" (docs/loadtests.md).
loadtest: setup
	$(BIN)/python -m loadtests.run $(LOADTEST_ARGS)

sim: setup
	$(BIN)/python -m dkv.testing.sim --seed $(SEED) --verbose

# Dashboards as code (grafana-foundation-sdk); the JSON is committed and
# tests/telemetry/test_dashboards.py fails when it is stale. The Helm chart ships copies
# (tests/chart fails when they differ).
dashboards: setup
	$(BIN)/python grafana/dashboards.py
	cp grafana/dashboards/*.json charts/dkv/files/dashboards/

# Cached under ${DKV_CACHE_DIR:-~/.cache/dkv}/jaeger/<version>/; prints the binary's path.
jaeger:
	tools/jaeger/build.sh

# Jaeger for `make run` and the end-to-end trace test, built once when a Go toolchain is here.
# Without Go (exit 3), or when the build fails (no module proxy), the trace test uses its own
# OTLP receiver and `make run` runs without traces: say so, and go on.
trace-backend: setup
	@$(BIN)/python -c 'import sys; from dkv.telemetry.jaeger import cached_jaeger_path as p; sys.exit(p().is_file())' \
	    && echo "building Jaeger from its Go module, once (about 4 min on 2 cores) ..." || true
	@tools/jaeger/build.sh >/dev/null 2>.jaeger-build.log; rc=$$?; \
	if [ $$rc -eq 0 ]; then rm -f .jaeger-build.log; \
	elif [ $$rc -eq 3 ]; then rm -f .jaeger-build.log; echo "note: no Go toolchain, so no Jaeger: make run has no trace backend, and the trace test uses its OTLP receiver"; \
	else tail -5 .jaeger-build.log; echo "note: building Jaeger failed (log in .jaeger-build.log): the trace test uses its OTLP receiver"; fi

# Cached under ${DKV_CACHE_DIR:-~/.cache/dkv}/etcd/<version>/ (etcd, etcdctl); prints etcd's path.
etcd36:
	tools/etcd/build.sh

# etcd 3.6 for `make bench` and `make bench-node` (an order-only prerequisite), built once when a
# Go toolchain is here. Without Go (exit 3), or when the build fails, the benchmarks run etcd 3.4
# alone and say so: say so here too, and go on.
ETCD36_VERSION := $(shell sed -n 's/^ETCD_VERSION=//p' tools/etcd/build.sh)
bench-etcd36:
	@test -x "$${DKV_CACHE_DIR:-$$HOME/.cache/dkv}/etcd/$(ETCD36_VERSION)/etcd" \
	    || echo "etcd $(ETCD36_VERSION) not built yet: building it from its Go modules when Go is here, once (about 1 min on 2 cores) ..."
	@tools/etcd/build.sh >/dev/null 2>.etcd-build.log; rc=$$?; \
	if [ $$rc -eq 0 ]; then rm -f .etcd-build.log; \
	elif [ $$rc -eq 3 ]; then rm -f .etcd-build.log; echo "note: no Go toolchain, so no etcd 3.6: the benchmark compares with etcd 3.4 only"; \
	else tail -5 .etcd-build.log; echo "note: building etcd 3.6 failed (log in .etcd-build.log): the benchmark compares with etcd 3.4 only"; fi

# Cached under ${DKV_CACHE_DIR:-~/.cache/dkv}/helm/<version>/; prints the binary's path.
helm:
	tools/helm/build.sh

# Helm for the chart tests (tests/chart, in `make test`), built once when a Go toolchain is
# here. Without Go (exit 3), or when the build fails, the chart tests skip -- except under CI
# (CI set), where they fail: CI has Go, and the chart must not go unchecked.
HELM_VERSION := $(shell sed -n 's/^HELM_VERSION=//p' tools/helm/build.sh)
HELM := $${DKV_CACHE_DIR:-$$HOME/.cache/dkv}/helm/$(HELM_VERSION)/helm
chart-helm:
	@# Announced only when there is a Go to build with (go_module.sh's lookup): without one, the
	@# note below is the one line.
	@if [ ! -x "$(HELM)" ] && { if [ -n "$${GO:-}" ]; then [ -x "$$GO" ]; \
	    else command -v go >/dev/null || [ -x /usr/local/go/bin/go ]; fi; }; then \
	    echo "Helm $(HELM_VERSION) not built yet: building it from its Go module, once (about 3 min on 2 cores) ..."; fi
	@tools/helm/build.sh >/dev/null 2>.helm-build.log; rc=$$?; \
	if [ $$rc -eq 0 ]; then rm -f .helm-build.log; \
	elif [ $$rc -eq 3 ]; then rm -f .helm-build.log; echo "note: no Go toolchain, so no Helm: the chart tests skip (under CI they fail)"; \
	else tail -5 .helm-build.log; echo "note: building Helm failed (log in .helm-build.log): the chart tests skip (under CI they fail)"; fi

chart-lint: chart-helm
	"$(HELM)" lint --strict charts/dkv

# The chart's certificates for the release dkv in the namespace dkv, as plain manifests
# (cert-manager/README.md); tests/chart/test_cert_manager.py checks they are current.
cert-manager-manifests: chart-helm
	{ sed -n '1,/^---$$/p' cert-manager/dkv-certificates.yaml; \
	  "$(HELM)" template dkv charts/dkv --namespace dkv --show-only templates/certificates.yaml \
	    | sed -e '1,/^# Source: /d' -e '/^# Source: /d' -e '/^    helm.sh\/chart: /d' -e '/^    app.kubernetes.io\/managed-by: Helm$$/d'; \
	} > cert-manager/dkv-certificates.yaml.tmp
	mv cert-manager/dkv-certificates.yaml.tmp cert-manager/dkv-certificates.yaml

# A real single-node Kubernetes (kube/README.md): built from the Go module proxy once and
# cached; every process in one network namespace, every file under build/kube.
kube-up: setup
	$(BIN)/python -m kube.cluster up

# Everything kube-up runs, built and cached without starting anything (CI builds it before
# the tests, so the compilers do not share the 2 cores with timing-sensitive suites).
kube-build:
	kube/build.sh >/dev/null
	tools/etcd/build.sh >/dev/null
	kube/images/build.sh all >/dev/null

kube-down: setup
	$(BIN)/python -m kube.cluster down

# charts/dkv installed on that cluster and the platform's tests against its pods
# (tests/kube_cluster); the cluster must be up (make kube-up), or every test fails saying so.
test-kube: setup chart-helm
	DKV_KUBE_TEST=require $(BIN)/python -m pytest -m kube tests/kube_cluster -v

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
