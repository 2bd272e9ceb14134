"""Runs every case of tests/support/diffusers_cases.py TORCHRUN_CASES in one torchrun launch (gloo on
CPU): each rank loads the pipeline from its folder (a PREPARED case loads or enables its state on it),
calls `parafuse.parallelize` and the pipeline with the same arguments, and saves its output (the
latent, on every rank) and byte counts (a `-disagree` case first calls with an argument that differs
on rank 1, and saves the refusal; a HANDOFFS case first calls its base pipeline and saves the base's
latents, which are its refiner's image on this rank). Each rank seeds its global RNG apart before
the call and saves a draw from it after.
Usage: torchrun --nproc_per_node N tests/support/diffusers_worker.py PIPELINES_DIR OUT_DIR [CASE ...] (default: all)"""
import os
import sys

import torch
import torch.distributed as dist

from support.diffusers_cases import (ALL_TORCHRUN_CASES, HANDOFFS, PREPARED, TORCHRUN_CASES, base_kwargs,  # noqa: E402
                                     family_kwargs, images, pipeline_path, refiner_kwargs)

import parafuse  # noqa: E402
from parafuse.diffusers import load_pipeline  # noqa: E402
from parafuse.parallel.agreement import DisagreementError  # noqa: E402
from parafuse.parallel.distributed import run_guarded  # noqa: E402


def main(root: str, out_dir: str, *cases: str) -> None:
    rank = int(os.environ["RANK"])          # the process group forms in parafuse.parallelize
    for name in cases or TORCHRUN_CASES:
        family, settings = ALL_TORCHRUN_CASES[name]
        plain = load_pipeline(pipeline_path(root, family))
        call = PREPARED[name](plain) if name in PREPARED else lambda: family_kwargs(family)
        latents = None
        if name in HANDOFFS:      # no broadcast: this rank's own base latents go to its refiner
            base = parafuse.parallelize(load_pipeline(pipeline_path(root, HANDOFFS[name])), **settings)
            latents = images(base(**base_kwargs()))
            base.close()
            call = lambda: refiner_kwargs(latents)      # noqa: E731
        pipe = parafuse.parallelize(plain, **settings)
        refusal = None
        if name.endswith("-disagree"):        # a call that differs on rank 1: refused on every rank
            try:
                pipe(**{**family_kwargs(family), "guidance_scale": 3.0 + rank})
            except DisagreementError as e:
                refusal = str(e)
        torch.manual_seed(1000 + rank)        # the ranks' global RNGs apart: the call gives them rank 0's
        out = images(pipe(**call()))
        torch.save({"images": out, "rank_stats": pipe.rank_stats, "refusal": refusal, "base_latents": latents,
                    "global_draw": torch.rand(4)}, os.path.join(out_dir, f"{name}.rank{rank}.pt"))
        pipe.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run_guarded(main, *sys.argv[1:])
