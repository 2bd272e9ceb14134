"""Generate one high-resolution image, on one process or patch-parallel under torchrun.

    python -m parafuse.generate --height 1024 --width 1024 --out image.png
    torchrun --nproc_per_node 4 -m parafuse.generate --mode partial --height 2048 --width 2048

Every argument is checked before any denoising; a bad one exits with status 2 and one line on
stderr, and writes nothing. Outputs are written atomically (temporary file, then rename).
"""
from __future__ import annotations

import argparse
import os
import sys

from parafuse.models import MODELS
from parafuse.parallel.engine import MODES, NORM_MODES
from parafuse.solvers import SOLVERS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="parafuse.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="default", help=f"built-in model: {', '.join(MODELS)}")
    p.add_argument("--weights", default=None, help="safetensors file overriding the model's own weights")
    p.add_argument("--height", type=int, default=512, help="image height in pixels")
    p.add_argument("--width", type=int, default=512, help="image width in pixels")
    p.add_argument("--steps", type=int, default=20,
                   help="denoising steps of the one-stage schedule; the bottleneck schedule scales its stages "
                        "to it and reports its FLOPs against it (see --schedule)")
    p.add_argument("--schedule", default="plain", choices=("plain", "bottleneck"),
                   help="plain: every step at the image size; bottleneck: full, half, full resolution with "
                        "stage steps 6/20/8 per 50 --steps, strengths 1/0.8/0.6, shifts 3x/2x/3x the model's")
    p.add_argument("--stages", nargs="+", default=None, metavar="HxW:STEPS[:STRENGTH[:SHIFT]]",
                   help="an explicit stage list, e.g. 256x256:20 512x512:8:0.6:3; the last stage is the image "
                        "size; a stage entered at strength w runs the last ceil(w*STEPS) steps of its grid")
    p.add_argument("--solver", default="dpmpp-2m", help=f"one of: {', '.join(SOLVERS)}")
    p.add_argument("--spacing", default=None, choices=("linspace", "leading", "trailing", "karras"),
                   help="timestep spacing (default: the schedule's own, linspace)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: off)")
    p.add_argument("--label", type=int, default=None, help="class label for class-conditional models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1, help="images generated together (seeded as one noise tensor)")
    p.add_argument("--out", default="parafuse.png", help="output PNG (with --batch > 1: NAME-0.png, NAME-1.png, ...)")
    p.add_argument("--report", default=None, help="write the run report (JSON) here")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--mode", default="full", choices=MODES,
                   help="patch exchange: sync (exact), full (stale K/V of the whole image), "
                        "partial (stale K/V window of each neighbour), none (no exchange)")
    p.add_argument("--warmup-steps", type=int, default=4, help="first steps run synchronously")
    p.add_argument("--halo-portion", type=float, default=0.3,
                   help="partial mode: portion of each neighbour strip whose K/V a strip attends to")
    p.add_argument("--norm", default=None, choices=NORM_MODES,
                   help="GroupNorm across strips (default: exact in sync, corrected otherwise, local in none)")
    p.add_argument("--cfg-parallel", action="store_true", help="split the two guidance branches across rank pairs")
    p.add_argument("--compare-serial", action="store_true", help="also run the serial model and report PSNR")
    p.add_argument("--reference", default=None, help="PNG to compare the output with (PSNR in the report)")
    p.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture the steady-state step as a CUDA graph and replay it (CUDA only; not yet "
                        "verified on GPUs, see the README)")
    p.add_argument("--kernels", default="torch", choices=("torch", "triton"),
                   help="patch layers' kernels: PyTorch ops, or parafuse's Triton kernels (GroupNorm in two "
                        "launches; CUDA; not yet verified on GPUs, see the README)")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                   help="compute dtype of the model, halos and K/V (default: bf16 on CUDA, fp32 on CPU); "
                        "statistics and the solver stay float32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def output_paths(out: str, batch: int) -> list[str]:
    if batch == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}-{i}{ext or '.png'}" for i in range(batch)]


def check_writable(path: str, overwrite: bool) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {path!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write {path!r}: folder {folder!r} is not writable")
    if os.path.isdir(path):
        raise ValueError(f"cannot write {path!r}: it is a folder")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path!r} exists; pass --overwrite to replace it")


def check_args(args) -> None:
    """Checks of files and paths; the model, solver and parallel settings are checked by the
    runtime (ParallelConfig, Runtime.check), before any denoising."""
    if args.weights is not None and not os.path.isfile(args.weights):
        raise ValueError(f"weights file {args.weights!r} does not exist")
    if args.reference is not None and not os.path.isfile(args.reference):
        raise ValueError(f"reference image {args.reference!r} does not exist")
    for path in output_paths(args.out, max(1, args.batch)) + ([args.report] if args.report else []):
        check_writable(path, args.overwrite)


def run(args) -> int:
    import torch

    from parafuse import report as rep
    from parafuse.models import ModelError, load_model
    from parafuse.parallel.distributed import ParallelLayout
    from parafuse.parallel.geometry import GeometryError
    from parafuse.runtime import ParallelConfig, Request, RequestError, Runtime
    from parafuse.stages import parse_stages

    check_args(args)
    parallel = ParallelConfig(args.mode, args.warmup_steps, args.halo_portion, args.norm, args.cfg_parallel)
    req = Request(args.height, args.width, args.steps, args.solver, args.guidance, args.seed, args.label, args.batch,
                  solver_options={"spacing": args.spacing} if args.spacing else {}, schedule=args.schedule,
                  stages=parse_stages(args.stages) if args.stages is not None else None)
    try:
        runtime = Runtime(args.model, parallel, device=args.device, weights=args.weights, dtype=args.dtype,
                          cuda_graphs=args.cuda_graphs, kernels=args.kernels)
        runtime.check(req)
        reference = None
        if args.reference is not None:
            reference = rep.load_png(args.reference)
            if tuple(reference.shape[-2:]) != (args.height, args.width):
                raise RequestError(f"reference {args.reference!r} is {reference.shape[-1]}x{reference.shape[-2]}, "
                                   f"the output {args.width}x{args.height}")
    except (RequestError, ModelError, GeometryError) as e:
        raise ValueError(str(e)) from None

    if runtime.spec.untrained and runtime.layout.rank == 0:
        print(f"parafuse.generate: note: model {args.model!r} is untrained (random weights, for benchmarks): "
              f"its images are noise, its timings real", file=sys.stderr)
    result = runtime.generate(req, progress=not args.no_progress)
    ranks = runtime.gather_rank_stats(result)
    comparison = None
    if args.compare_serial and runtime.layout.rank == 0:
        serial = Runtime(load_model(args.model, args.weights), ParallelConfig(), device=args.device,
                         layout=ParallelLayout(0, 1), dtype=runtime.dtype)
        comparison = rep.compare(result.image, serial.generate(req).image, "serial")
    elif reference is not None and runtime.layout.rank == 0:
        comparison = rep.compare(result.image[0], reference, args.reference)
    if runtime.layout.world_size > 1:
        torch.distributed.barrier()      # the others wait while rank 0 runs the serial reference
    if runtime.layout.rank == 0:
        for image, path in zip(result.image, output_paths(args.out, args.batch)):
            rep.save_png_atomic(image, path)
        if args.report:
            rep.write_json_atomic(args.report, rep.build_report(runtime, req, result, ranks, comparison))
        psnr = f", PSNR vs {comparison['reference']} {comparison['psnr_db']:.2f} dB" if comparison else ""
        print(f"wrote {', '.join(output_paths(args.out, args.batch))} "
              f"({result.timing['total_seconds']:.2f} s denoising on {runtime.layout.world_size} rank(s){psnr})")
    runtime.close()
    return 0


def main(argv=None) -> int:
    from parafuse.parallel.distributed import run_guarded

    args = parse_args(argv)
    try:
        code = run_guarded(run, args, user_errors=(ValueError,))
    except ValueError as e:
        # the same message on every rank: only rank 0 prints it
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"parafuse.generate: error: {e}", file=sys.stderr)
        code = 2
    _shutdown()
    return code


def _shutdown() -> None:
    try:
        import gc

        import torch.distributed as dist
        if dist.is_initialized():
            gc.collect()        # drop what still refers to the process group, so destroying it joins its threads
            dist.destroy_process_group()
    except Exception:
        pass


if __name__ == "__main__":
    sys.exit(main())
