#!/usr/bin/env bash
# The wheels the GPU machines lack for gpu_check's pipelines sections, into .wheels/ (git-ignored),
# for their Python 3.12 on x86-64; the device tool carries them (carry=[".wheels"]) and
# benchmarks/gpu_session.sh installs them there. Run here, where pip reaches the registry:
#
#     bash benchmarks/gpu_wheels.sh            # PYTHON=/path/to/python to pick the pip
#
# Only diffusers travels. Its other requirements are installed on those machines
# (/work/.library/device/KINDS.md, read 2026-11-17): huggingface-hub (1.33.0; diffusers 0.42.1 asks
# >= 1.32), safetensors (0.8.0; asks >= 0.8.0), filelock, numpy, regex, requests, Pillow - and
# importlib_metadata, which it lists, is imported only on Python < 3.8 (the standard library's
# importlib.metadata otherwise). The pipelines build the models directly: no transformers or peft
# is needed beyond the machine's own (the pipeline classes import transformers, which it has).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=(diffusers==0.42.1)

rm -rf .wheels
"$PYTHON" -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --no-deps -d .wheels "${WHEELS[@]}"
for whl in .wheels/*.whl; do      # what each needs, to check against the machine's list
    echo "$(basename "$whl"): $(unzip -p "$whl" '*/METADATA' | grep '^Requires-Dist' | grep -v extra \
        | sed 's/Requires-Dist: //' | paste -sd, -)"
done
bytes=$(cat .wheels/*.whl | wc -c)
echo "$(ls .wheels | wc -l) wheel(s), $((bytes / 1024 / 1024)) MiB (the device tool carries at most 64 MiB a call)"
(( bytes < 32 * 1024 * 1024 )) || { echo "too large to carry beside the working tree" >&2; exit 1; }
