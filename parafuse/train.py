"""Train a built-in denoiser with flow matching on random crops of scikit-image's photographs.

    python -m parafuse.train --model default --steps 6000 --out runs/default
    python -m parafuse.train --resume runs/default/checkpoint.safetensors --steps 8000   # continue
    python -m parafuse.train --evaluate                                                  # loss table

Objective (rectified flow, as SD3): x_σ = (1-σ)·x0 + σ·ε, the model predicts v = ε - x0 from
(x_σ, σ·1000), loss = MSE(v̂, v). σ is drawn logit-normal, σ = sigmoid(n), n ~ N(0, 1), which puts
most samples at mid noise where the velocity is hardest to predict (SD3, Esser et al. 2024).

Every random draw of training (crops, flips, σ, noise) comes from one torch.Generator whose state
is saved in the checkpoint together with the model, the EMA, AdamW's moments and the step, so
k steps + resume + k steps equals 2k steps bit for bit (same thread count, same machine). The
learning-rate schedule depends only on the step (warmup, then inverse-sqrt decay), never on
--steps, so a run may be extended by resuming with a larger --steps; `--cooldown START:END`
anneals it to zero at the end (and may be added when resuming).

The shipped weights came from:
    python -m parafuse.train --model default --steps 6000 --out runs/default   # lr 1e-3; stopped at 3750
    python -m parafuse.train --resume runs/default/checkpoint.safetensors --steps 5500 --cooldown 3750:5500
    python -m parafuse.train --resume runs/default/checkpoint.safetensors --steps 5500 \
        --export parafuse/models/weights/default.safetensors                              # export only
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from parafuse.data import DEFAULT_HELD_OUT, CropSampler, DataError, fixed_crops, split_names
from parafuse.models import MODELS, ModelError, ModelSpec, get_spec

CKPT_FORMAT = "parafuse-train-1"
WARMUP = 200            # steps of linear LR warmup
DECAY_REF = 2000        # LR ∝ 1/sqrt(step/DECAY_REF) after this step (EDM2-style, horizon-free)
EMA_DECAY = 0.999
# the hyperparameters a checkpoint fixes; resuming with a different value would not continue the run
RUN_KEYS = ("model", "batch", "crop", "lr", "seed", "held_out")
DEFAULTS = dict(model="default", batch=16, crop="128,256", lr=1e-3, seed=0, held_out=",".join(DEFAULT_HELD_OUT))


class TrainError(ValueError):
    """A bad argument or checkpoint; printed as one line."""


# ----------------------------------------------------------------------------- objective

def lr_at(step: int, lr: float, cooldown: list[int] | None = None) -> float:
    """Warmup, inverse-sqrt decay, and optionally a linear cooldown to zero over steps
    [start, end) (annealing the LR at the end lowers the loss more than the same steps at high LR)."""
    base = lr * min(1.0, (step + 1) / WARMUP) / math.sqrt(max(1.0, step / DECAY_REF))
    if cooldown and step >= cooldown[0]:
        start, end = cooldown
        return lr_at(start, lr) * max(0.0, (end - step) / (end - start))
    return base


def flow_loss(model: nn.Module, x0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Velocity MSE at logit-normal σ; draws σ then ε from `g` (order matters for resume)."""
    sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=g))
    eps = torch.randn(x0.shape, generator=g)
    s = sigma[:, None, None, None]
    x = (1 - s) * x0 + s * eps
    return F.mse_loss(model(x, sigma * 1000), eps - x0)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, step: int) -> None:
    # short warmup of the decay so early EMA weights are not dominated by the random init
    d = min(EMA_DECAY, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - d)


# ----------------------------------------------------------------------------- evaluation

EVAL_SIGMAS = (0.1, 0.25, 0.5, 0.75, 0.9)


def heldout_batch(spec: ModelSpec, names, crop: int = 128, per_image: int = 6, seed: int = 0):
    """Fixed evaluation data: latents x0 [B,C,h,w] of crops of `names`, σ values, noise [S,B,C,h,w]."""
    x0 = spec.codec().encode(fixed_crops(list(names), crop, per_image, seed))
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn((len(EVAL_SIGMAS),) + tuple(x0.shape), generator=g)
    return x0, torch.tensor(EVAL_SIGMAS), noise


@torch.no_grad()
def x0_mse(denoise, x0: torch.Tensor, sigmas: torch.Tensor, noise: torch.Tensor, border: int = 0) -> torch.Tensor:
    """Per-σ MSE of the clean estimate x̂0 = denoise(x_σ, σ) against x0, on the interior
    (`border` latent pixels dropped on each side, so estimators with a finite window compare fairly).
    Velocity MSE is this divided by σ²."""
    out = []
    for s, eps in zip(sigmas.tolist(), noise):
        xhat = denoise((1 - s) * x0 + s * eps, s)
        err = (xhat - x0)[..., border:x0.shape[-2] - border, border:x0.shape[-1] - border]
        out.append(err.pow(2).mean())
    return torch.stack(out)


def model_denoiser(model: nn.Module):
    def denoise(x, s):
        v = torch.cat([model(xb, torch.full((xb.shape[0],), s * 1000.0)) for xb in x.split(16)])
        return x - s * v
    return denoise


class WienerDenoiser:
    """The best *linear* (affine) estimator of a latent pixel's x0 from the k x k neighbourhood of x_σ.

    Fitted in closed form from the training data's patch statistics. With the latent treated as
    stationary (per-channel mean μ, covariance Σ of k x k x C patches, estimated from `num_crops`
    random training crops), x_σ = (1-σ)·x0 + σ·ε with ε ~ N(0, I), and the linear MMSE estimate of the
    centre pixel c is

        x̂0_c = μ_c + (1-σ)·Σ_cP · [(1-σ)²·Σ_PP + σ²·I]^(-1) · (x_σ,P - (1-σ)·μ_P)

    i.e. the least-squares optimal affine map per σ, in expectation over the Gaussian noise. Applied
    as a k x k convolution without padding, so its output covers the interior only (border k//2).
    """

    def __init__(self, spec: ModelSpec, train_names, k: int = 5, crop: int = 128, num_crops: int = 96, seed: int = 0):
        self.k, self.codec = k, spec.codec()
        sampler = CropSampler(list(train_names), crop)
        g = torch.Generator().manual_seed(seed)
        lat = self.codec.encode(sampler.sample(num_crops, g))              # [N, C, h, w]
        c = lat.shape[1]
        self.mu = lat.mean(dim=(0, 2, 3)).double()                         # [C]
        patches = F.unfold(lat - self.mu.float()[None, :, None, None], k)  # [N, C*k*k, L]
        p = patches.transpose(1, 2).reshape(-1, c * k * k)
        self.cov = (p.T @ p).double() / p.shape[0]                         # [D, D]; fp32 sums of ~75k terms suffice
        # centre pixel's channels in unfold's (C, kh, kw) feature order
        self.centre = torch.arange(c) * k * k + (k * k) // 2
        self.mu_p = self.mu.repeat_interleave(k * k)
        self.channels = c

    def filter(self, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        a = 1.0 - sigma
        d = self.cov.shape[0]
        m = a * a * self.cov + sigma * sigma * torch.eye(d, dtype=torch.float64)
        A = a * torch.linalg.solve(m, self.cov[:, self.centre]).T          # [C, D] (m is symmetric)
        bias = self.mu - A @ (a * self.mu_p)
        return A.reshape(self.channels, self.channels, self.k, self.k).float(), bias.float()

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        w, b = self.filter(sigma)
        out = F.conv2d(x, w, b)                                            # interior only
        return F.pad(out, [self.k // 2] * 4)                               # zeros at the border: ignored by x0_mse


def evaluate(spec: ModelSpec, trained: nn.Module, held_out, train_names, seed: int = 0) -> dict:
    """x0-MSE on the fixed held-out batch for the trained model, the untrained init, and Wiener."""
    x0, sigmas, noise = heldout_batch(spec, held_out, seed=seed)
    wiener = WienerDenoiser(spec, train_names, seed=seed)
    border = wiener.k // 2
    untrained = spec.build(seed).eval()
    return {
        "sigmas": sigmas.tolist(),
        "trained": x0_mse(model_denoiser(trained), x0, sigmas, noise, border).tolist(),
        "untrained": x0_mse(model_denoiser(untrained), x0, sigmas, noise, border).tolist(),
        "wiener": x0_mse(wiener, x0, sigmas, noise, border).tolist(),
    }


@torch.no_grad()
def sample_image(model: nn.Module, spec: ModelSpec, height: int, width: int, steps: int = 20, seed: int = 0,
                 solver: str = "dpmpp-2m") -> torch.Tensor:
    """One image [3, H, W] in [-1, 1], serial, through the runtime that `parafuse.generate` uses."""
    from parafuse.parallel.distributed import ParallelLayout
    from parafuse.runtime import ParallelConfig, Request, Runtime

    model.spec = spec
    runtime = Runtime(model, ParallelConfig(), device="cpu", layout=ParallelLayout(0, 1))
    return runtime.generate(Request(height, width, steps, solver, seed=seed)).image[0]


def save_checkpoint(path: str, model, ema, opt, gen: torch.Generator, step: int, run: dict, elapsed: float) -> None:
    from safetensors.torch import save_file

    t = {f"model.{k}": v for k, v in model.state_dict().items()}
    t.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            t[f"opt.{i}.{k}"] = torch.as_tensor(v)
    t["rng.train"] = gen.get_state()
    t["rng.torch"] = torch.get_rng_state()
    meta = {"format": CKPT_FORMAT, "step": str(step), "run": json.dumps(run), "elapsed_s": f"{elapsed:.1f}",
            "threads": str(torch.get_num_threads())}
    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in t.items()}, tmp, metadata=meta)
    os.replace(tmp, path)        # atomic: a kill mid-write never leaves a torn checkpoint


def read_checkpoint(path: str) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise TrainError(f"checkpoint {path!r} does not exist")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise TrainError(f"checkpoint {path!r} is not a readable safetensors file ({e})") from None
    if meta.get("format") != CKPT_FORMAT:
        raise TrainError(f"{path!r} is not a parafuse training checkpoint (format {meta.get('format')!r})")
    return tensors, meta


def load_checkpoint(tensors: dict, model, ema, opt, gen: torch.Generator) -> None:
    def sub(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    model.load_state_dict(sub("model."))
    ema.load_state_dict(sub("ema."))
    state: dict[int, dict] = {}
    for k, v in sub("opt.").items():
        i, name = k.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    gen.set_state(tensors["rng.train"])
    torch.set_rng_state(tensors["rng.torch"])


def export_weights(ema: nn.Module, path: str, dtype: torch.dtype, meta: dict) -> None:
    """EMA weights as a plain state dict (what load_model reads); fp16 halves the file and
    load_state_dict casts back into the fp32 parameters."""
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in ema.state_dict().items()}, path,
              metadata={k: str(v) for k, v in meta.items()})


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m parafuse.train", description=__doc__.split("\n")[0])
    p.add_argument("--model", help=f"built-in model to train (default {DEFAULTS['model']}); one of {', '.join(MODELS)}")
    p.add_argument("--steps", type=int, help="train until this total step count (required unless --evaluate)")
    p.add_argument("--batch", type=int, help=f"crops per step (default {DEFAULTS['batch']})")
    p.add_argument("--crop", help="crop size in pixels, or a comma list cycled step by step with the batch scaled to"
                   f" keep pixels per step constant (default {DEFAULTS['crop']}: larger crops teach larger structure)")
    p.add_argument("--lr", type=float, help=f"peak AdamW learning rate (default {DEFAULTS['lr']})")
    p.add_argument("--seed", type=int, help="seed of init and of every random draw (default 0)")
    p.add_argument("--held-out", help=f"comma-separated photographs never trained on (default {DEFAULTS['held_out']})")
    p.add_argument("--out", help="run directory: checkpoint.safetensors, log.jsonl, ema.safetensors")
    p.add_argument("--resume", help="checkpoint to continue from (its run settings are kept)")
    p.add_argument("--cooldown", help="START:END - anneal the LR linearly to 0 from step START to END; may be"
                   " added when resuming a run that has none, if START >= the checkpoint's step")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; resume bit-exactly with the same count)")
    p.add_argument("--ckpt-every", type=int, default=250, help="steps between checkpoints (default 250)")
    p.add_argument("--eval-every", type=int, default=500, help="steps between held-out evaluations, 0 = never (default 500)")
    p.add_argument("--export", help="also write the EMA weights here at the end (e.g. parafuse/models/weights/default.safetensors)")
    p.add_argument("--export-dtype", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--evaluate", action="store_true", help="print held-out x0-MSE of trained vs untrained vs Wiener and exit")
    p.add_argument("--weights", help="with --evaluate: weights file to evaluate (default: the model's shipped file)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p.parse_args(argv)


def _parse_cooldown(text: str) -> list[int]:
    try:
        start, end = (int(v) for v in text.split(":"))
    except ValueError:
        raise TrainError(f"--cooldown must be START:END (steps), got {text!r}") from None
    if not 0 <= start < end:
        raise TrainError(f"--cooldown needs 0 <= START < END, got {text!r}")
    return [start, end]


def resolve_run(args, ckpt_meta: dict | None) -> dict:
    """The run's fixed settings: from the checkpoint when resuming (a conflicting flag is an error),
    else from the flags and defaults. Validates every value."""
    given = {k: getattr(args, k) for k in RUN_KEYS}
    if ckpt_meta is not None:
        run = json.loads(ckpt_meta["run"])
        finished = run.get("cooldown") is not None and int(ckpt_meta["step"]) >= run["cooldown"][1]
        if args.cooldown is not None and (run.get("cooldown") is None or finished):
            # the one setting a run may gain on resume: a cooldown that starts at or after the checkpoint
            # (a run whose cooldown has ended may be extended with another: the LR re-warms to the
            # inverse-sqrt value at START and anneals again)
            cd = _parse_cooldown(args.cooldown)
            if cd[0] < int(ckpt_meta["step"]):
                raise TrainError(f"--cooldown must start at or after the checkpoint's step {ckpt_meta['step']}, got {cd[0]}")
            run["cooldown"] = cd
        elif args.cooldown is not None and _parse_cooldown(args.cooldown) != run.get("cooldown"):
            raise TrainError(f"--cooldown {args.cooldown} conflicts with the checkpoint's {run.get('cooldown')}")
        norm = {"crop": lambda c: ",".join(x.strip() for x in str(c).split(","))}
        for k, v in given.items():
            if v is not None and norm.get(k, lambda x: x)(v) != norm.get(k, lambda x: x)(run[k]):
                raise TrainError(f"--{k.replace('_', '-')} {v} conflicts with the checkpoint's {run[k]!r}; "
                                 "drop the flag to continue that run")
    else:
        run = {k: (DEFAULTS[k] if v is None else v) for k, v in given.items()}
        run["crop"] = ",".join(x.strip() for x in str(run["crop"]).split(","))
        run["cooldown"] = _parse_cooldown(args.cooldown) if args.cooldown is not None else None
    try:
        spec = get_spec(run["model"])
    except ModelError as e:
        raise TrainError(str(e)) from None
    if run["batch"] < 1:
        raise TrainError(f"--batch must be >= 1, got {run['batch']}")
    try:
        crops = [int(c) for c in str(run["crop"]).split(",")]
    except ValueError:
        raise TrainError(f"--crop must be an integer or a comma list of integers, got {run['crop']!r}") from None
    if any(c < spec.pixel_factor or c % spec.pixel_factor for c in crops):
        raise TrainError(f"--crop sizes must be positive multiples of {spec.pixel_factor} for model {spec.name!r}, got {run['crop']}")
    if not (0 < run["lr"] < 1):
        raise TrainError(f"--lr must be in (0, 1), got {run['lr']}")
    try:
        split_names([n for n in run["held_out"].split(",") if n])
    except DataError as e:
        raise TrainError(str(e)) from None
    return run


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    tensors = meta = None
    if args.resume:
        tensors, meta = read_checkpoint(args.resume)
    run = resolve_run(args, meta)
    start = int(meta["step"]) if meta else 0
    if args.steps is None or args.steps < start or args.steps < 0:
        raise TrainError(f"--steps must be >= {start} (the step to train up to), got {args.steps}")
    if run.get("cooldown") and args.steps > run["cooldown"][1]:
        raise TrainError(f"--steps {args.steps} is past the cooldown's end {run['cooldown'][1]} (the LR would be 0)")
    out = args.out or (os.path.dirname(os.path.abspath(args.resume)) if args.resume else None)
    if out is None:
        raise TrainError("--out DIR is required for a new run")
    os.makedirs(out, exist_ok=True)

    spec = get_spec(run["model"])
    train_names, held_out = split_names([n for n in run["held_out"].split(",") if n])
    crops = [int(c) for c in str(run["crop"]).split(",")]
    samplers = [CropSampler(train_names, c) for c in crops]
    # same pixel count per step whatever the crop: batch scales with (first crop / crop)²
    batches = [max(1, round(run["batch"] * (crops[0] / c) ** 2)) for c in crops]
    codec = spec.codec()
    model = spec.build(run["seed"]).train()
    ema = spec.build(run["seed"]).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=run["lr"], betas=(0.9, 0.99), weight_decay=0.01)
    gen = torch.Generator().manual_seed(run["seed"])
    torch.manual_seed(run["seed"])       # nothing should draw from the global RNG, but if it does, seed it
    elapsed0 = 0.0
    if tensors is not None:
        load_checkpoint(tensors, model, ema, opt, gen)
        elapsed0 = float(meta.get("elapsed_s", 0))
        tensors = None       # free the checkpoint copy

    ckpt_path = os.path.join(out, "checkpoint.safetensors")
    log_path = os.path.join(out, "log.jsonl")
    _truncate_log(log_path, start)       # drop lines a killed run wrote after its last checkpoint
    log = open(log_path, "a")
    evalset = heldout_batch(spec, held_out) if args.eval_every and held_out else None

    from tqdm import tqdm
    bar = tqdm(total=args.steps, initial=start, disable=args.no_progress, dynamic_ncols=True, desc="train")
    t0, smooth = time.perf_counter(), None
    step = start
    for step in range(start, args.steps):
        lr = lr_at(step, run["lr"], run.get("cooldown"))
        for group in opt.param_groups:
            group["lr"] = lr
        i = step % len(crops)
        x0 = codec.encode(samplers[i].sample(batches[i], gen))
        loss = flow_loss(model, x0, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, step)
        done = step + 1
        lv = loss.item()
        smooth = lv if smooth is None else 0.98 * smooth + 0.02 * lv
        rec = {"step": done, "loss": round(lv, 6), "lr": lr, "grad_norm": round(float(gnorm), 4),
               "elapsed_s": round(elapsed0 + time.perf_counter() - t0, 1)}
        if evalset is not None and done % args.eval_every == 0:
            rec["heldout_x0_mse"] = [round(v, 6) for v in x0_mse(model_denoiser(ema), *evalset).tolist()]
        log.write(json.dumps(rec) + "\n")
        bar.set_postfix(loss=f"{smooth:.4f}")
        bar.update(1)
        if done % args.ckpt_every == 0 or done == args.steps:
            log.flush()
            save_checkpoint(ckpt_path, model, ema, opt, gen, done, run, elapsed0 + time.perf_counter() - t0)
    bar.close()
    log.close()
    elapsed = elapsed0 + time.perf_counter() - t0
    if args.steps == start and meta is None:      # a 0-step new run still leaves a checkpoint
        save_checkpoint(ckpt_path, model, ema, opt, gen, start, run, elapsed)
    wmeta = {"model": spec.name, "step": args.steps, "run": json.dumps(run), "train_wall_s": f"{elapsed:.0f}"}
    export_weights(ema, os.path.join(out, "ema.safetensors"), torch.float32, wmeta)
    if args.export:
        export_weights(ema, args.export, {"fp32": torch.float32, "fp16": torch.float16}[args.export_dtype], wmeta)
    return {"step": args.steps, "elapsed_s": elapsed, "out": out}


def _truncate_log(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)


def run_evaluate(args) -> dict:
    from parafuse.models import load_model

    torch.set_num_threads(args.threads)
    spec = get_spec(args.model or DEFAULTS["model"])
    train_names, held_out = split_names([n for n in (args.held_out or DEFAULTS["held_out"]).split(",") if n])
    if not held_out:
        raise TrainError("--evaluate needs at least one held-out photograph")
    try:
        model = load_model(spec.name, weights=args.weights)
    except ModelError as e:
        raise TrainError(str(e)) from None
    res = evaluate(spec, model, held_out, train_names)
    print(f"held-out x0-MSE ({spec.name}; photographs {', '.join(held_out)}; interior of 128 px crops)")
    print(f"{'sigma':>6} {'trained':>10} {'untrained':>10} {'wiener':>10}")
    for i, s in enumerate(res["sigmas"]):
        print(f"{s:6.2f} {res['trained'][i]:10.5f} {res['untrained'][i]:10.5f} {res['wiener'][i]:10.5f}")
    mean = {k: sum(res[k]) / len(res[k]) for k in ("trained", "untrained", "wiener")}
    print(f"{'mean':>6} {mean['trained']:10.5f} {mean['untrained']:10.5f} {mean['wiener']:10.5f}")
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.threads < 1:
            raise TrainError(f"--threads must be >= 1, got {args.threads}")
        if args.ckpt_every < 1 or args.eval_every < 0:
            raise TrainError("--ckpt-every must be >= 1 and --eval-every >= 0")
        if args.evaluate:
            run_evaluate(args)
        else:
            train(args)
    except (TrainError, DataError) as e:
        print(f"parafuse.train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
