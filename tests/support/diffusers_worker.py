"""Runs every case of parafuse/diffusers/tiny.py TORCHRUN_CASES in one torchrun launch (gloo on CPU):
each rank loads the pipeline from its folder, calls `parafuse.parallelize` and the pipeline with the
same arguments, and saves its output (None except on rank 0) and byte counts (a `-disagree` case
first calls with an argument that differs on rank 1, and saves the refusal).
Usage: torchrun --nproc_per_node N tests/support/diffusers_worker.py PIPELINES_DIR OUT_DIR [CASE ...] (default: all)"""
import os
import sys

import torch
import torch.distributed as dist

from support.diffusers_cases import ALL_TORCHRUN_CASES, TORCHRUN_CASES, family_kwargs, images, pipeline_path  # noqa: E402

import parafuse  # noqa: E402
from parafuse.diffusers import load_pipeline  # noqa: E402
from parafuse.parallel.agreement import DisagreementError  # noqa: E402
from parafuse.parallel.distributed import run_guarded  # noqa: E402


def main(root: str, out_dir: str, *cases: str) -> None:
    rank = int(os.environ["RANK"])          # the process group forms in parafuse.parallelize
    for name in cases or TORCHRUN_CASES:
        family, settings = ALL_TORCHRUN_CASES[name]
        pipe = parafuse.parallelize(load_pipeline(pipeline_path(root, family)), **settings)
        refusal = None
        if name.endswith("-disagree"):        # a call that differs on rank 1: refused on every rank
            try:
                pipe(**{**family_kwargs(family), "guidance_scale": 3.0 + rank})
            except DisagreementError as e:
                refusal = str(e)
        out = images(pipe(**family_kwargs(family)))
        torch.save({"images": out, "rank_stats": pipe.rank_stats, "refusal": refusal},
                   os.path.join(out_dir, f"{name}.rank{rank}.pt"))
        pipe.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run_guarded(main, *sys.argv[1:])
