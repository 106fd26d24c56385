#!/usr/bin/env bash
# The GPU check of issue #14 in one command (sfd_scale/bench/gpu_check.py says what it checks; `sfd gpu-check` runs
# it, through the shim tools/gpu_check.py here); writes benchmarks/RESULTS.md.
#
#   bash tools/gpu_check.sh --golden DIR --official-code DIR      # on one H100, <= 8 minutes
#   bash tools/gpu_check.sh --cpu-smoke                            # anywhere, tiny sizes, about a minute
#
# Python packages the GPU image lacks (megatron-core, omegaconf, mosaicml-streaming, ... : whatever of
# REQUIRED below does not import) are installed from the wheels in $SFD_WHEELS (default: wheels/ at the
# repository root, ignored by git: never commit wheels). Fill it on a machine with pip and network access:
#   bash tools/gpu_check.sh --download-wheels       # Python 3.12 / manylinux x86-64 wheels of REQUIRED (no deps)
# then add the wheels of any dependency the install reports missing (pip download --no-deps NAME==VERSION,
# same flags), and carry the folder with the working tree (the golden set and the official code too: they
# live outside it). Installing uses --no-deps: the torch of the GPU image is never replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${SFD_WHEELS:-wheels}
REQUIRED="megatron.core:megatron-core omegaconf:omegaconf streaming:mosaicml-streaming safetensors:safetensors \
yaml:pyyaml einops:einops timm:timm scipy:scipy"

missing() {  # the pip names of REQUIRED modules that do not import
  for pair in $REQUIRED; do
    "$PY" -c "import ${pair%%:*}" >/dev/null 2>&1 || printf '%s ' "${pair##*:}"
  done
}

if [[ "${1:-}" == "--download-wheels" ]]; then
  mkdir -p "$WHEELS"
  names=$(for pair in $REQUIRED; do printf '%s ' "${pair##*:}"; done)
  # shellcheck disable=SC2086
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$WHEELS" $names
  echo "gpu_check: wheels in $WHEELS (carry that folder to the GPU machine; do not commit it)"
  exit 0
fi

need=$(missing)
if [[ -n "$need" ]]; then
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/sfd_site "$WHEELS"/*.whl \
      || { echo "gpu_check: could not install $need from $WHEELS (see pip's message above)"; exit 3; }
    export PYTHONPATH="/tmp/sfd_site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  still=$(missing)
  if [[ -n "$still" ]]; then
    echo "gpu_check: missing Python packages: $still(put their wheels in $WHEELS: bash tools/gpu_check.sh --download-wheels)"
    exit 3
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" tools/gpu_check.py "$@"
