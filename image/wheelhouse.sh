#!/bin/sh
# wheelhouse.sh PYTHON SRC OUT: the project's wheel, built from the source tree SRC, and every
# wheel it needs with the `envoy` extra (Envoy's binary), plus pip, in the directory OUT.
# Binary wheels only (--only-binary): nothing is compiled, so no stage needs a compiler.
# Run by the Dockerfile's builder stage and by `make image` (image/build.sh) with its .venv.
set -eu
py=$1 src=$2 out=$3
mkdir -p "$out"
"$py" -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$out" "$src"
set -- "$out"/dkv-*.whl
if [ $# -ne 1 ] || [ ! -f "$1" ]; then
    echo "wheelhouse.sh: expected one dkv wheel in $out, found: $*" >&2
    exit 1
fi
"$py" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
    --dest "$out" "$1[envoy]" pip
