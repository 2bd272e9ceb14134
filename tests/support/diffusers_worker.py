"""Runs every case of parafuse/diffusers/tiny.py TORCHRUN_CASES in one torchrun launch (gloo on CPU):
each rank loads the pipeline from its folder, calls `parafuse.parallelize` and the pipeline with the
same arguments, and saves its output (None except on rank 0) and byte counts.
Usage: torchrun --nproc_per_node N tests/support/diffusers_worker.py PIPELINES_DIR OUT_DIR [CASE ...] (default: all)"""
import os
import sys

import torch
import torch.distributed as dist

from support.diffusers_cases import ALL_TORCHRUN_CASES, TORCHRUN_CASES, family_kwargs, images, pipeline_path  # noqa: E402

import parafuse  # noqa: E402
from parafuse.diffusers import load_pipeline  # noqa: E402
from parafuse.parallel.distributed import run_guarded  # noqa: E402


def main(root: str, out_dir: str, *cases: str) -> None:
    for name in cases or TORCHRUN_CASES:
        family, settings = ALL_TORCHRUN_CASES[name]
        pipe = parafuse.parallelize(load_pipeline(pipeline_path(root, family)), **settings)
        out = images(pipe(**family_kwargs(family)))
        rank = dist.get_rank()
        torch.save({"images": out, "rank_stats": pipe.rank_stats}, os.path.join(out_dir, f"{name}.rank{rank}.pt"))
        pipe.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run_guarded(main, *sys.argv[1:])
