#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous. Run the same command on every node:
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=0 launch/multi_node.sh 8 --height 4096 --width 4096
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=1 launch/multi_node.sh 8 --height 4096 --width 4096
# Ranks are numbered node by node, so each patch group stays inside a node and, with
# --cfg-parallel, the two CFG branches run on different nodes. Each process takes its GPU from
# LOCAL_RANK. PYTHON picks the interpreter (default: python3); RDZV_ID names the job.
set -euo pipefail
nproc=${1:?usage: multi_node.sh NPROC_PER_NODE [parafuse.generate args...]}
shift
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
: "${NNODES:?set NNODES}"
: "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1)}"
exec "${PYTHON:-python3}" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --nproc_per_node "$nproc" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29400}" \
    --rdzv_id "${RDZV_ID:-parafuse}" -m parafuse.generate "$@"
