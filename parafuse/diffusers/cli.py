"""`python -m parafuse.generate --model PATH`: a diffusers pipeline from a local folder, patch-parallel.

    torchrun --nproc_per_node 4 -m parafuse.generate --model ./sdxl --prompt "a lighthouse" \
        --height 2048 --width 2048 --steps 30 --guidance 5 --mode partial
    python -m parafuse.generate --model ./tiny --prompt-embeds embeds.pt --height 256 --width 256

The pipeline runs with its own scheduler. `--prompt-embeds FILE` (a `torch.save`d dict of tensors
named as the pipeline's call arguments: prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
prompt_attention_mask, ...) serves pipelines saved without text encoders. Every argument is checked
before the pipeline runs; outputs are written atomically by rank 0.
"""
from __future__ import annotations

import inspect
import os
import sys
import time

# generate.py's flags that pick parafuse's own samplers and models: a diffusers pipeline has its own
# (a pipeline runs eagerly, with its scheduler's one-stage schedule)
BUILTIN_ONLY = {"weights": None, "solver": "dpmpp-2m", "spacing": None, "label": None, "compare_serial": False,
                "reference": None, "cuda_graphs": None, "kernels": None, "schedule": "plain", "stages": None,
                "startup_timeout": 600.0, "exchange_timeout": 300.0}


def pipeline_kwargs(args, call_parameters) -> dict:
    """The pipeline call's keyword arguments from the command line (and the embeddings file)."""
    kwargs = {"height": args.height, "width": args.width, "num_inference_steps": args.steps,
              "guidance_scale": args.guidance, "num_images_per_prompt": args.batch, "output_type": "pt"}
    if "use_resolution_binning" in call_parameters:
        kwargs["use_resolution_binning"] = False     # PixArt: the image is the size asked for, not a binned one
    if args.prompt is not None:
        kwargs["prompt"] = args.prompt
    if args.negative_prompt is not None:
        kwargs["negative_prompt"] = args.negative_prompt
    if args.prompt_embeds is not None:
        embeds = load_prompt_embeds(args.prompt_embeds, args.model)
        unknown = sorted(set(embeds) - set(call_parameters))
        if unknown:
            raise ValueError(f"--prompt-embeds {args.prompt_embeds!r} has {', '.join(unknown)}, which the pipeline "
                             f"does not take")
        kwargs.update(embeds)
        if "negative_prompt_embeds" in embeds and "negative_prompt" in call_parameters and args.negative_prompt is None:
            kwargs["negative_prompt"] = None      # PixArt's default "" would clash with the embeddings
    return kwargs


def denoiser_widths(model_dir: str) -> dict[str, int]:
    """The last dimension the denoiser's config fixes for each embedding argument, read from its
    config.json before anything loads: the text width (U-Net cross-attention, SD3/Flux joint
    attention, PixArt captions) and, where the config names it, the pooled width (SD3, Flux)."""
    from parafuse.checks import read_json
    for sub in ("unet", "transformer"):
        path = os.path.join(model_dir, sub, "config.json")
        if os.path.isfile(path):
            config = read_json(path, "denoiser config")
            break
    else:
        return {}
    widths = {}
    text = next((config[k] for k in ("cross_attention_dim", "joint_attention_dim", "caption_channels")
                 if isinstance(config.get(k), int)), None)
    if text is not None:
        widths.update(prompt_embeds=text, negative_prompt_embeds=text)
    if isinstance(config.get("pooled_projection_dim"), int):
        widths.update(pooled_prompt_embeds=config["pooled_projection_dim"],
                      negative_pooled_prompt_embeds=config["pooled_projection_dim"])
    return widths


def load_prompt_embeds(path: str, model_dir: str) -> dict:
    """--prompt-embeds: a torch.save'd dict of tensors; every embedding of a width the denoiser's
    config fixes is checked against it. Any other content is refused in one line, before the
    pipeline loads."""
    import pickle

    import torch

    from parafuse.checks import CheckError, check_input_file
    check_input_file(path, "--prompt-embeds")
    try:
        embeds = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckError(f"--prompt-embeds {path!r} is not a torch.save'd file of tensors "
                         f"({type(e).__name__}): save a dict of tensors with torch.save") from None
    if not isinstance(embeds, dict) or not embeds or not all(isinstance(v, torch.Tensor) for v in embeds.values()):
        raise CheckError(f"--prompt-embeds {path!r} must hold a dict of tensors named as the pipeline's arguments "
                         f"(prompt_embeds, negative_prompt_embeds, ...)")
    for name, width in denoiser_widths(model_dir).items():
        t = embeds.get(name)
        if t is not None and (t.dim() < 2 or t.shape[-1] != width or not t.is_floating_point()):
            raise CheckError(f"--prompt-embeds {path!r}: {name} is {t.dtype} of shape {tuple(t.shape)}; the "
                             f"pipeline's denoiser takes floating-point embeddings {width} wide (last dimension)")
    return embeds


def check_finite(par, out) -> None:
    """After the pipeline's call and before anything is written: every rank raises the same
    NonFiniteError if rank 0's images or any rank's exchanged GroupNorm statistics (the strip
    engine's device flag, parafuse.health) were NaN or infinite. The diffusers loop is the
    pipeline's own, so this is checked once, at its end, not every few steps."""
    import torch

    from parafuse.health import NonFiniteError
    engine = getattr(par.strips, "engine", None) if par.strips is not None else None
    bad = engine is not None and engine.nonfinite is not None and bool(engine.nonfinite)
    if out is not None:
        bad = bad or not bool(torch.isfinite(out.images).all())
    flags = torch.zeros(par.layout.world_size)
    flags[par.layout.rank] = float(bad)
    if par.layout.world_size > 1:
        par.strips.transport.agree(flags).wait()
    ranks = [r for r, v in enumerate(flags.tolist()) if v > 0]
    if ranks:
        where = f" on rank {', '.join(map(str, ranks))}" if par.layout.world_size > 1 else ""
        raise NonFiniteError(f"the latent became NaN or infinite during the pipeline's denoising{where}; nothing was "
                             f"written. A schedule, guidance or weights that overflow cause this: try fewer steps, "
                             f"lower guidance or check the weights")


def run_pipeline(args) -> int:
    """generate.py's `run` for a diffusers pipeline folder."""
    import torch

    import parafuse
    from parafuse import attention
    from parafuse import report as rep
    from parafuse.checks import read_json
    from parafuse.diffusers.pipeline import denoiser_of, load_pipeline
    from parafuse.generate import check_args, given_flags, halo_portion, join_job, output_paths, report_moved
    from parafuse.outputs import commit
    from parafuse.parallel.distributed import pick_device
    from parafuse.parallel.engine import check_settings
    from parafuse.runtime import dtype_name, resolve_dtype

    check_args(args)
    given = given_flags(args, BUILTIN_ONLY)
    if given:
        raise ValueError(f"{', '.join(given)}: only for parafuse's built-in models; a diffusers pipeline runs "
                         f"eagerly with its own weights, scheduler and one-stage schedule, without parafuse's "
                         f"host deadlines")
    if args.prompt is None and args.prompt_embeds is None:
        raise ValueError("a diffusers pipeline needs --prompt or --prompt-embeds FILE")
    index = read_json(os.path.join(args.model, "model_index.json"), "pipeline index")
    text_encoder = index.get("text_encoder", [None]) if isinstance(index, dict) else None
    if args.prompt is not None and (not isinstance(text_encoder, list) or text_encoder[0] is None):
        raise ValueError(f"pipeline {args.model!r} was saved without a text encoder: pass --prompt-embeds FILE")
    portion = halo_portion(args)
    check_settings(args.mode, portion, args.warmup_steps, args.norm, args.text_merge, args.kv_codec)
    if args.prompt_embeds is not None:
        load_prompt_embeds(args.prompt_embeds, args.model)      # its content, before the pipeline loads
    join_job(args, watch=False)      # torchrun: the process group, the arguments compared, the folders probed
    device = pick_device(args.device)
    backend = attention.use_backend(args.attention_backend, device)     # the processors' attention() reads it
    dtype = resolve_dtype(args.dtype, device)
    pipe = load_pipeline(args.model, dtype, device, progress=not args.no_progress)
    call_parameters = inspect.signature(pipe.__call__).parameters
    kwargs = pipeline_kwargs(args, call_parameters)
    par = parafuse.parallelize(pipe, mode=args.mode, halo_portion=portion, warmup_steps=args.warmup_steps,
                               cfg_parallel=args.cfg_parallel, norm_mode=args.norm, text_merge=args.text_merge,
                               kv_codec=args.kv_codec)
    engine = getattr(par.strips, "engine", None) if par.strips is not None else None
    if engine is not None:              # each evaluation's GroupNorm statistics, for check_finite
        denoiser_of(pipe)[1].register_forward_hook(lambda *_: engine.check_statistics())
    code = 0
    start = time.perf_counter()
    out = par(generator=torch.Generator().manual_seed(args.seed), **kwargs)
    seconds = time.perf_counter() - start
    check_finite(par, out)
    ranks = [par.rank_stats]
    if par.layout.world_size > 1:
        import torch.distributed as dist
        ranks = [None] * par.layout.world_size if par.layout.rank == 0 else None
        dist.gather_object(par.rank_stats, ranks, dst=0)
    if par.layout.rank == 0:        # every output rendered first, then all renamed into place together
        paths = output_paths(args.out, args.batch)
        files = {path: rep.png_bytes(image.float() * 2 - 1) for image, path in zip(out.images, paths)}
        if args.report:
            files[args.report] = rep.json_bytes({
                "model": args.model, "pipeline": type(pipe).__name__, "height": args.height, "width": args.width,
                "steps": args.steps, "guidance": args.guidance, "seed": args.seed, "device": rep.device_name(device),
                "torch": torch.__version__, "diffusers": _diffusers_version(), "world_size": par.layout.world_size,
                "mode": args.mode, "warmup_steps": args.warmup_steps, "halo_portion": portion,
                "cfg_parallel": args.cfg_parallel, "text_merge": args.text_merge, "kv_codec": args.kv_codec,
                "attention_backend": backend, "dtype": dtype_name(dtype),
                "total_seconds": seconds, "ranks": ranks})
        moved = commit(files, overwrite=args.overwrite)
        print(f"wrote {', '.join(moved.get(p, p) for p in paths)} ({seconds:.2f} s on {par.layout.world_size} "
              f"rank(s))", file=sys.stdout)
        code = report_moved(moved)
    par.close()
    return code


def _diffusers_version() -> str:
    import diffusers
    return diffusers.__version__
