#!/usr/bin/env bash
# One node: N ranks (GPUs, or CPU processes with gloo where no GPU is present).
#   launch/single_node.sh 4 --height 2048 --width 2048 --mode partial --out image.png
# Extra arguments go to parafuse.generate. PYTHON picks the interpreter (default: python3).
set -euo pipefail
nproc=${1:?usage: single_node.sh NPROC [parafuse.generate args...]}
shift
exec "${PYTHON:-python3}" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m parafuse.generate "$@"
