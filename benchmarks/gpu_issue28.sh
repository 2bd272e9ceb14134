#!/usr/bin/env bash
# Issue 28's GPU checks, prepared on a CPU-only session, for a session with one GPU (H100/H200) to run
# as they are: about 10 minutes of device time in all. Before copying the tree to the GPU machine, stamp
# the commit here (the copy has no git): `python benchmarks/common.py stamp` (writes benchmarks/stamp.json).
# Every JSON written carries that commit, the device, driver/CUDA/torch/Triton/NCCL versions and the command.
#
# 1. gpu_check's scaling and graphs sections again (sync rows in every table, the serial step on each kernel
#    choice, memory after the cast, host-bound rows flagged, partial at 4096²), then its projection (both bounds,
#    the charge from this run's own loopback row): replaces those sections of the committed H100 JSON.
# 2. 4096², N = 1 and 8, graphed, both kernel choices, full / sync / partial, unet-xl and dit-xl (dit-xl graphed is
#    new), 10 repeats: replaces scaling_h100_4096_graphs_kernels.json (one configuration, one figure), then its
#    projection. Afterwards, on the CPU side: python benchmarks/report.py (docs/performance.md) and commit.
# 3. The projection against the one-GPU emulator with a modelled link (item 4; ~60 s estimated, not yet run on a
#    GPU): the default U-Net at 256², N = 2 ranks as threads on the GPU, sync / full / partial with and without the
#    stale communicator; skipped when its JSON exists (benchmarks/results/project_emulator_<gpu>.json).
set -euo pipefail
export PYTHONPATH=.:kernels
test -f benchmarks/stamp.json || echo "warning: no benchmarks/stamp.json: the results will say commit unknown" >&2
slug=$(python -c "import torch,re;print(re.sub(r'[^a-z0-9]+','_',torch.cuda.get_device_name().lower()).strip('_'))")
short=$(python -c "s='$slug';print('h100' if 'h100' in s else 'h200' if 'h200' in s else s)")   # the committed names
out=benchmarks/results/gpu_check_${slug}.json
timeout 420 python benchmarks/gpu_check.py --only scaling graphs projection --out "$out"
timeout 300 python benchmarks/scaling.py --models unet-xl dit-xl --sizes 4096 --ranks 1 8 --modes full sync partial \
    --cuda-graphs --kernels torch triton --device cuda --dtype bf16 --repeat 10 --budget 240 \
    --name "scaling_${short}_4096_graphs_kernels"
python benchmarks/project.py --scaling "benchmarks/results/scaling_${short}_4096_graphs_kernels.json" \
    --name "${short}_4096_graphs_kernels"
emulator=benchmarks/results/project_emulator_${short}.json
test -f "$emulator" || timeout 120 python benchmarks/project.py --validate-emulator --device cuda --models default \
    --sizes 256 --emulator-repeats 2 --name "emulator_${short}" || echo "warning: the emulator validation failed" >&2
mkdir -p "${OUT:-/tmp/out}" && cp "$out" benchmarks/results/*"${short}_4096_graphs_kernels"* "${OUT:-/tmp/out}/"
if [ -f "$emulator" ]; then cp "$emulator" "${OUT:-/tmp/out}/"; fi
