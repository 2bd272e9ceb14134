"""Where one rank's steady-state strip step spends its time: a torch.profiler table of its kernels.

One process, one strip (ParallelLayout(strip, N)) over a NullTransport (compute alone, as
benchmarks/scaling.py measures it), eager or graphed; after `--warmup` steps, `--steps` steps are
profiled and the table sorted by device time (CUDA kernels, or CPU ops on a CPU). Divide a row's
total by `--steps` for its cost per step. `--trace` also writes a Chrome trace (open it in
https://ui.perfetto.dev), which ties each kernel to the ATen op that launched it.

    PYTHONPATH=.:kernels python benchmarks/profile_step.py --model unet-xl --size 2048 --n 8 --strip 4
    PYTHONPATH=.:kernels python benchmarks/profile_step.py --model unet-xl --size 2048 --n 8 --strip 4 --eager --trace t.json
    python benchmarks/profile_step.py --model default --size 128 --n 2 --device cpu      # the logic, on CPU
"""
from __future__ import annotations

import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_device, add_run, hardware, parser, patch_config  # noqa: E402

from parafuse.models import load_model  # noqa: E402
from parafuse.parallel.distributed import ParallelLayout  # noqa: E402
from parafuse.parallel.parallelize import unparallelize  # noqa: E402
from parafuse.parallel.transport import NullTransport  # noqa: E402
from parafuse.parallel.config import Kernels  # noqa: E402
from parafuse.runtime import Request, Runtime  # noqa: E402

KERNELS = [k.value for k in Kernels]


def main(argv=None) -> None:
    p = parser(__doc__)
    add_run(p, model="unet-xl", size=2048, mode="full")
    p.add_argument("--n", type=int, default=8, help="strips (ranks)")
    p.add_argument("--strip", type=int, default=None, help="which strip (default: a middle one, N // 2)")
    add_device(p)
    p.add_argument("--kernels", default=None, choices=KERNELS,
                   help="the patch layers' kernels (default: the runtime's, triton on CUDA)")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs (on CUDA they are on by default)")
    p.add_argument("--warmup", type=int, default=3, help="steps before profiling (capture happens in them)")
    p.add_argument("--steps", type=int, default=3, help="steps profiled")
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--trace", default=None, help="also write a Chrome trace here")
    a = p.parse_args(argv)
    strip = a.n // 2 if a.strip is None else a.strip
    device = torch.device(a.device)
    model = load_model(a.model, device=device)
    req = Request(a.size, a.size, steps=8, solver="ddim", seed=0, context=None,
                  label=0 if model.spec.num_classes else None)
    config = patch_config(a.mode, 1, dtype=a.dtype, kernels=a.kernels, cuda_graphs=False if a.eager else None)
    rt = Runtime(model, config, device=a.device, layout=ParallelLayout(strip, a.n), transport=NullTransport(strip, a.n))
    try:
        step = rt.rank_step(req)
        for _ in range(a.warmup):
            step()
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(a.steps):
                step()
            if cuda:
                torch.cuda.synchronize(device)
    finally:
        rt.engine.drain()
        unparallelize(model)
    hw = hardware() if cuda else {**hardware(), "device": "cpu"}
    print(f"{a.model} {a.size}², strip {strip} of {a.n}, {a.mode}, {rt.dtype}, "
          f"{'graphed' if rt.cuda_graphs else 'eager'}, {a.steps} steps profiled; {hw['device']}, torch {hw['torch']}\n")
    print(prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                    row_limit=a.rows, max_name_column_width=70))
    if a.trace:
        prof.export_chrome_trace(a.trace)
        print(f"wrote {a.trace}")


if __name__ == "__main__":
    main()
