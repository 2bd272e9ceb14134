"""Runs every case of tests/support/parallel_cases.py in one torchrun launch (gloo on CPU) and saves,
per case and rank, the image (rank 0), the rank's byte counts and the rows of every conv input
it saw. Usage: torchrun --nproc_per_node N tests/support/dist_worker.py OUT_DIR"""
import os
import sys

import torch
import torch.distributed as dist

from support.parallel_cases import cases  # noqa: E402

from parafuse.models import load_model  # noqa: E402
from parafuse.parallel.distributed import ParallelLayout, init_distributed, run_guarded  # noqa: E402
from parafuse.runtime import Runtime  # noqa: E402


def main(out_dir: str) -> None:
    torch.manual_seed(0)
    rank, world = init_distributed(torch.device("cpu"))
    for name, (model, cfg, req) in cases(world).items():
        layout = ParallelLayout(rank, world, 2 if cfg.cfg_parallel else 1)
        rt = Runtime(load_model(model), cfg, "cpu", layout=layout)
        conv_rows = {}
        for mod_name, mod in rt.model.named_modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.register_forward_hook(lambda m, a, o, n=mod_name: conv_rows.setdefault(n, a[0].shape[2]) and None)
        result = rt.generate(req)
        ranks = rt.gather_rank_stats(result)
        torch.save({"image": result.image, "rank_stats": result.rank_stats, "ranks": ranks, "conv_rows": conv_rows},
                   os.path.join(out_dir, f"{name}.rank{rank}.pt"))
        rt.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run_guarded(main, sys.argv[1])
