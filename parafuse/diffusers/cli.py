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

    import torch

    from parafuse.checks import CheckError, check_input_file
    check_input_file(path, "--prompt-embeds")
    try:
        embeds = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:        # any unreadable content (pickle raises many types on junk): one line, no traceback
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


def run_pipeline(args, config, paths: list[str]) -> int:
    """generate.py's `run` for a diffusers pipeline folder, once generate.py has checked the
    arguments (`config`: their PatchConfig; `paths`: the output files)."""
    import torch

    import parafuse
    from parafuse import report as rep
    from parafuse.diffusers.pipeline import load_pipeline
    from parafuse.job import join_job, report_moved
    from parafuse.outputs import commit
    from parafuse.parallel.config import Dtype, TORCH_DTYPES
    from parafuse.parallel.distributed import pick_device

    from parafuse.checks import read_json

    if args.prompt is None and args.prompt_embeds is None:
        raise ValueError("a diffusers pipeline needs --prompt or --prompt-embeds FILE")
    index = read_json(os.path.join(args.model, "model_index.json"), "pipeline index")
    text_encoder = index.get("text_encoder", [None]) if isinstance(index, dict) else None
    if args.prompt is not None and (not isinstance(text_encoder, list) or text_encoder[0] is None):
        raise ValueError(f"pipeline {args.model!r} was saved without a text encoder: pass --prompt-embeds FILE")
    if args.prompt_embeds is not None:
        load_prompt_embeds(args.prompt_embeds, args.model)      # its content, before the pipeline loads
    join_job(args, watch=True)       # torchrun: the process group, the arguments compared, the folders probed
    device = pick_device(args.device)
    dtype = TORCH_DTYPES[config.dtype or (Dtype.BF16 if device.type == "cuda" else Dtype.FP32)]
    pipe = load_pipeline(args.model, dtype, device, progress=not args.no_progress)
    call_parameters = inspect.signature(pipe.__call__).parameters
    kwargs = pipeline_kwargs(args, call_parameters)
    par = parafuse.parallelize(pipe, config, text_merge=args.text_merge)
    if par.layout.rank == 0 and not args.no_progress:
        pipe.set_progress_bar_config(disable=False)      # load_pipeline silenced it; one bar per job
    out = par(generator=torch.Generator().manual_seed(args.seed), **kwargs)
    ranks = par.session.gather_rank_stats(par.rank_stats)
    code = 0
    if par.layout.rank == 0:        # every output rendered first, then all renamed into place together
        files = {path: rep.png_bytes(image.float() * 2 - 1) for image, path in zip(out.images, paths)}
        if args.report:
            run = {"model": args.model, "pipeline": type(pipe).__name__, "height": args.height, "width": args.width,
                   "steps": args.steps, "solver": type(pipe.scheduler).__name__, "guidance": args.guidance,
                   "seed": args.seed, "batch": args.batch, "schedule": "plain"}
            files[args.report] = rep.json_bytes(rep.run_report(par.session, run, par.timing, ranks))
        moved = commit(files, overwrite=args.overwrite)
        print(f"wrote {', '.join(moved.get(p, p) for p in paths)} ({par.timing['total_seconds']:.2f} s on "
              f"{par.layout.world_size} rank(s))", file=sys.stdout)
        code = report_moved(moved)
    par.close()
    return code
