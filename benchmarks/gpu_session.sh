#!/usr/bin/env bash
# The one way to run a lent GPU session's work (docs/gpu-guide.md): checks that the tree knows its
# commit, installs the carried wheels that python lacks into .deps/ (git-ignored), then runs
# benchmarks/gpu_session.py - the steps in priority order, each skipped when its result for this
# commit exists, none started past the time limit, what was written copied to $OUT.
#
#     here, first:  python benchmarks/common.py stamp        (the machine's copy has no git)
#     device tool:  run(command="bash benchmarks/gpu_session.sh", carry=[".wheels"], timeout_s=540)
#     here:         PYTHON=/work/main/.venv/bin/python bash benchmarks/gpu_session.sh --plan
#                   PYTHON=/work/main/.venv/bin/python bash benchmarks/gpu_session.sh --device cpu --smoke
#
# Arguments go to gpu_session.py (--limit SECONDS, default 470, counted from here; --plan). Refuses
# (exit 2) without git or benchmarks/stamp.json, and without .wheels/ where diffusers is not importable.
# GPU_RUN_ALL_WHEELS=1 installs every carried wheel, also those python already has.
set -euo pipefail
export GPU_SESSION_T0=${GPU_SESSION_T0:-$(date +%s)}
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! git rev-parse --git-dir >/dev/null 2>&1 && [[ ! -f benchmarks/stamp.json ]]; then
    echo "no git and no benchmarks/stamp.json: run python benchmarks/common.py stamp before the copy" >&2
    exit 2
fi
export PYTHONPATH=.:kernels:.deps${PYTHONPATH:+:$PYTHONPATH}

if [[ " $* " != *" --plan "* ]]; then
    wheels=(.wheels/*.whl)
    if [[ ! -e "${wheels[0]}" ]]; then
        "$PYTHON" -c 'import diffusers' 2>/dev/null || {
            echo "diffusers is not importable and there is no .wheels/: run benchmarks/gpu_wheels.sh here and carry .wheels" >&2
            exit 2; }
        wheels=()
    fi
    missing=()
    for whl in "${wheels[@]}"; do
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
fi
exec "$PYTHON" benchmarks/gpu_session.py "$@"
