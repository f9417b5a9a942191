#!/usr/bin/env bash
# The device check of issue 15 as one command, for a bare CUDA machine with torch but without MONAI, ignite,
# nibabel (carried as wheels in .whl/) and with no network. Run from anywhere:
#
#     OUT=/path/to/results bash bench/gpu_check.sh [gpu_check.py arguments, e.g. --tiny]
#
# 1. installs the carried wheels (.whl/*.whl) into $SITE (default /tmp/site) and puts them and the repository
#    on PYTHONPATH (an existing PYTHONPATH is kept after them);
# 2. builds the Cython supervoxel extension in place, in the background (the check itself trains on the
#    pseudolabels carried in .devdata/ when present, and otherwise generates them, which needs it);
# 3. runs bench/gpu_check.py --out $OUT, which writes gpu_check.json (rewritten after every run),
#    gpu_check.md (the table) and prints the table; its log goes to $OUT/gpu_check.log.
# Exit status: gpu_check.py's (0: every check passed, 1: some failed, see the table), 3: wheels not installed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/gpu_check}
SITE=${SITE:-/tmp/site}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "gpu_check.sh: installing .whl/*.whl into $SITE failed"; exit 3; }
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

"$PY" setup.py build_ext --inplace >"$OUT/build_ext.log" 2>&1 &
build_pid=$!

{ nvidia-smi 2>&1 || echo "no nvidia-smi"; "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|monai|pytorch-ignite|nibabel|numpy|scipy|scikit-image|cython) "; } >"$OUT/machine.txt"

"$PY" bench/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}

wait "$build_pid"
build_status=$?
if [ "$build_status" -eq 0 ] && "$PY" -c "import fsmis_monai._felzenszwalb3d"; then
    message="supervoxel extension: built and imported"
else
    message="supervoxel extension: NOT built (exit status $build_status, see $OUT/build_ext.log)"
fi
echo "$message" | tee -a "$OUT/gpu_check.log"
exit "$status"
