#!/usr/bin/env bash
# On a GPU machine (no package registry): install the carried wheels (benchmarks/gpu_wheels.sh) that
# its python3 lacks into .deps/ (git-ignored), then run benchmarks/gpu_check.py, whose sections run
# in its SECTIONS order: the pipelines at 2048² first, the pipelines at 4096² last. Arguments go to
# gpu_check.py (default: every section, more than one 10-minute command holds since issue 28: see
# docs/gpu-guide.md). The JSON files the run wrote in benchmarks/results/ are copied to $OUT where it
# is set (the device tool brings back what is under $OUT), also when gpu_check is stopped at
# GPU_RUN_TIMEOUT seconds (default 570).
#
#     device tool: run(command="bash benchmarks/gpu_run.sh", carry=[".wheels"], timeout_s=600)
#     here:        PYTHON=/work/main/.venv/bin/python GPU_RUN_ALL_WHEELS=1 \
#                  bash benchmarks/gpu_run.sh --device cpu --smoke --only pipelines
#
# GPU_RUN_ALL_WHEELS=1 installs every carried wheel, also those python already has (to check this
# script where they are installed, or to run the carried version).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
git rev-parse --git-dir >/dev/null 2>&1 || test -f benchmarks/stamp.json || \
    echo "warning: no git and no benchmarks/stamp.json (python benchmarks/common.py stamp, before the copy):" \
         "the results will say commit unknown" >&2
export PYTHONPATH=.:kernels:.deps${PYTHONPATH:+:$PYTHONPATH}

missing=()
for whl in .wheels/*.whl; do
    [[ -e "$whl" ]] || { echo "no wheels in .wheels/: run benchmarks/gpu_wheels.sh here and carry .wheels" >&2; exit 1; }
    name=$(basename "$whl" | cut -d- -f1)
    if [[ ${GPU_RUN_ALL_WHEELS:-0} == 1 ]] || \
       ! "$PYTHON" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$name" 2>/dev/null; then
        missing+=("$whl")
    fi
done
if (( ${#missing[@]} )); then
    echo "installing into .deps: ${missing[*]}"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .deps "${missing[@]}"
fi
"$PYTHON" -c 'import diffusers, torch; print(f"diffusers {diffusers.__version__} ({diffusers.__file__}), torch {torch.__version__}")'

started=$(mktemp)
rc=0
# stopped before the device tool's own limit (600 s a command), so that what was written still reaches $OUT
timeout "${GPU_RUN_TIMEOUT:-570}" "$PYTHON" benchmarks/gpu_check.py "$@" || rc=$?
(( rc != 124 )) || echo "gpu_check stopped after ${GPU_RUN_TIMEOUT:-570} s (GPU_RUN_TIMEOUT); the rows written so far are kept" >&2
if [[ -n "${OUT:-}" ]]; then
    find benchmarks/results -maxdepth 1 -name '*.json' -newer "$started" -exec cp {} "$OUT"/ \;
    echo "copied to \$OUT: $(ls "$OUT" | paste -sd' ' -)"
fi
rm -f "$started"
exit $rc
