"""The runtime session: one parallelized model, many images.

`Runtime` loads (or takes) a denoiser, joins torchrun's process group when launched by torchrun,
swaps patch layers into the model once, and then generates any number of images - at different
sizes, seeds and batch sizes - without rebuilding anything. Each rank denoises only its strip of
the latent; the image is gathered once, at the end, on rank 0.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn

from parafuse.checks import (CheckError, check_fits, check_numbers, check_request, check_runtime_args, check_schedule,
                             strip_geometry)
from parafuse.models import ModelSpec, load_model, weights_fingerprint
from parafuse.parallel import kv_codec
from parafuse.parallel.adapter import BUILTIN
from parafuse.parallel.config import DEFAULT_MODE, DEFAULT_WARMUP_STEPS, ConfigError, Kernels, PatchConfig
from parafuse.parallel.config import settings as config_settings
from parafuse.parallel.distributed import ParallelLayout
from parafuse.parallel.emulator import emulate_ranks
from parafuse.parallel.geometry import GeometryError, StripGeometry
from parafuse.parallel.plan import PatchPlan, SiteKind
from parafuse.parallel.reduce import StripReduce
from parafuse.parallel.session import PatchSession, StepClock
from parafuse.parallel.transport import Transport
from parafuse.profile import ModelProfile
from parafuse.sampling import denoise_stages, guided
from parafuse.solvers import SOLVERS, LocalReduce, cfg, make_schedule, make_solver
from parafuse.stages import (SCHEDULES, UPSAMPLE, Stage, StageError, bottleneck, carried_variance, check_stages,
                             enter_noisy, entry, plain, resize_latent, stage_report, stage_seed, start_step)


RequestError = CheckError    # a request that cannot run; one type for every refusal (parafuse.checks)


def ParallelConfig(mode: str = DEFAULT_MODE, warmup_steps: int = DEFAULT_WARMUP_STEPS,
                   halo_portion: float | None = None, norm_mode: str | None = None, cfg_parallel: bool = False,
                   kv_codec: str = "none", **settings) -> PatchConfig:
    """The `PatchConfig` of these settings, in the positional order this name has always taken
    (mode, warmup_steps, halo_portion, norm_mode, cfg_parallel, kv_codec); any other PatchConfig
    setting by keyword. Kept for scripts written before PatchConfig."""
    return PatchConfig(mode=mode, warmup_steps=warmup_steps, halo_portion=halo_portion, norm_mode=norm_mode,
                       cfg_parallel=cfg_parallel, kv_codec=kv_codec, **settings)


@dataclass(frozen=True)
class Request:
    height: int                       # image pixels
    width: int
    steps: int = 20
    solver: str = "dpmpp-2m"
    guidance: float = 1.0
    seed: int = 0
    label: int | None = None          # class label for class-conditional models
    batch: int = 1
    context: torch.Tensor | None = None   # [1, L, context_dim] text embedding for cross-attention models
    solver_options: dict = field(default_factory=dict, compare=False)   # e.g. {"thresholding": True}
    schedule: str = "plain"           # "plain" (one stage) or "bottleneck" (parafuse.stages)
    stages: tuple[Stage, ...] | None = None   # an explicit stage list instead (the last one is the image size)
    upsample: str = "lanczos"         # filter growing x̂0 at a stage change (shrinking is area-averaged)

    def __post_init__(self):
        check_request(self)           # types and plain ranges, each error naming its field


@dataclass
class Result:
    image: torch.Tensor | None        # [B, 3, H, W] in [-1, 1] on CPU, rank 0 only
    latent: torch.Tensor | None       # [B, C, h, w] on CPU, rank 0 only
    rank_stats: dict                  # this rank's rows, bytes and memory
    timing: dict = field(default_factory=dict)


def initial_noise(seed: int, shape: tuple[int, ...], rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Noise for the whole latent from `seed`, then the strip's rows: the same numbers for any N."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=g)
    return noise if rows is None else noise[:, :, rows[0]:rows[1]].contiguous()


class Runtime:
    """One parallelized built-in model, many images: a `PatchSession` plus the built-in sampling loop
    (solvers as explicit steppers, stages, the fused update).

    `parallel` is the PatchConfig (or `ParallelConfig(...)`); the keyword arguments `dtype`,
    `cuda_graphs`, `kernels`, `attention_backend`, `startup_timeout` and `exchange_timeout`, where
    given, replace the config's. Device-dependent defaults (bf16, CUDA graphs and the Triton kernels
    on CUDA; fp32, eager, PyTorch ops elsewhere) are resolved by the session: `self.config`."""

    def __init__(self, model: str | nn.Module = "default", parallel: PatchConfig | None = None,
                 device: str | None = None, weights: str | None = None, layout: ParallelLayout | None = None,
                 transport: Transport | None = None, dtype: str | torch.dtype | None = None,
                 cuda_graphs: bool | None = None, kernels: str | None = None, attention_backend: str | None = None,
                 startup_timeout: float | None = None, exchange_timeout: float | None = None):
        check_runtime_args(locals())      # types, each error naming its argument
        given = {"dtype": dtype, "cuda_graphs": cuda_graphs, "kernels": kernels,
                 "attention_backend": attention_backend, "startup_timeout": startup_timeout,
                 "exchange_timeout": exchange_timeout}
        parallel = PatchConfig() if parallel is None else parallel
        try:
            self.session = PatchSession(parallel.replace(**{k: v for k, v in given.items() if v is not None}),
                                        device=device, layout=layout, transport=transport)
        except ConfigError as e:
            raise RequestError(str(e)) from None
        if isinstance(model, str):
            model = load_model(model, weights, device=self.device)
        self.weights = weights_fingerprint(weights)       # compared across the ranks with each request
        self.spec: ModelSpec = model.spec
        if self.config.cfg_parallel and not self.conditional:
            raise RequestError(f"--cfg-parallel needs a conditional model; {self.spec.name!r} is unconditional")
        self.model = model.to(device=self.device, dtype=self.dtype)
        self.profile = ModelProfile.trace(self.model, self.spec.latent_channels, self.spec.downsample_factor,
                                          BUILTIN.example_kwargs(self.spec, self.device, self.dtype))
        self.session.attach(self.model)

    # the session's, under the names scripts use
    config = property(lambda self: self.session.config)
    parallel = config
    device = property(lambda self: self.session.device)
    dtype = property(lambda self: self.session.dtype)
    layout = property(lambda self: self.session.layout)
    transport = property(lambda self: self.session.transport)
    engine = property(lambda self: self.session.engine)
    watchdog = property(lambda self: self.session.watchdog)
    cuda_graphs = property(lambda self: self.config.cuda_graphs)
    kernels = property(lambda self: self.config.kernels)
    attention_backend = property(lambda self: self.config.attention_backend)

    @property
    def conditional(self) -> bool:
        return bool(self.spec.num_classes or self.spec.context_dim)

    # ---- validation: everything a user can get wrong, before any model work ----------------
    def check(self, req: Request) -> StripGeometry:
        spec = self.spec
        f = spec.pixel_factor
        check_numbers(req)
        if req.height <= 0 or req.width <= 0 or req.height % f or req.width % f:
            raise RequestError(f"height and width must be positive multiples of {f} for model {spec.name!r} "
                               f"(got {req.height}x{req.width}); try {max(f, round(req.height / f) * f)}x"
                               f"{max(f, round(req.width / f) * f)}")
        if req.solver not in SOLVERS:
            raise RequestError(f"unknown solver {req.solver!r}; valid solvers: {', '.join(SOLVERS)}")
        if req.guidance != 1.0 and not self.conditional:
            raise RequestError(f"model {spec.name!r} is unconditional: guidance {req.guidance} has nothing to "
                               f"guide by; use a class- or text-conditional model or guidance 1")
        if self.parallel.cfg_parallel and req.guidance == 1.0:
            raise RequestError("--cfg-parallel splits the two guidance branches across ranks; it needs guidance > 1")
        if req.label is not None and not 0 <= req.label < spec.num_classes:
            raise RequestError(f"model {spec.name!r} has {spec.num_classes} classes; label {req.label} is out of range"
                               if spec.num_classes else f"model {spec.name!r} takes no class label")
        if spec.context_dim and req.context is not None and req.context.shape[-1] != spec.context_dim:
            raise RequestError(f"context must be [1, L, {spec.context_dim}] for model {spec.name!r}, "
                               f"got {tuple(req.context.shape)}")
        geometry = strip_geometry(self, req)
        for i, stage in enumerate(self.stages(req)):
            try:
                self.profile.check_strips(self.stage_geometry(stage))
            except GeometryError as e:
                raise RequestError(f"stage {i + 1} ({stage.height}x{stage.width} px) is too small for "
                                   f"{self.layout.patch_degree} strips: {e}") from None
        if self.engine is not None and self.parallel.kv_codec != "none":
            for site in self.profile.sites:
                if site.kind == SiteKind.ATTN:
                    try:
                        kv_codec.check_channels(site.channels, f"model {spec.name!r}'s attention {site.key!r}")
                    except ValueError as e:
                        raise RequestError(str(e)) from None
        check_schedule(self, req)
        check_fits(self, req, geometry)
        return geometry

    def stages(self, req: Request) -> tuple[Stage, ...]:
        """The request's schedule as a checked list of stages (parafuse.stages)."""
        if req.schedule not in SCHEDULES:
            raise RequestError(f"unknown schedule {req.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if req.upsample not in UPSAMPLE:
            raise RequestError(f"unknown upsampling {req.upsample!r}; valid: {', '.join(UPSAMPLE)}")
        if req.stages is not None and req.schedule != "plain":
            raise RequestError(f"give either an explicit stage list or --schedule {req.schedule}, not both")
        own = make_schedule(**self.spec.schedule)
        if req.stages is not None:
            stages = tuple(req.stages)
        elif req.schedule == "bottleneck":
            stages = bottleneck(req.height, req.width, req.steps, self.spec.pixel_factor,
                                own.shift if own.kind == "flow" else None)
        else:
            stages = plain(req.height, req.width, req.steps)
        try:
            check_stages(stages, req.height, req.width, self.spec.pixel_factor, own.kind == "flow")
        except StageError as e:
            raise RequestError(str(e)) from None
        return stages

    def stage_geometry(self, stage: Stage) -> StripGeometry:
        f = self.spec.codec_factor
        return StripGeometry(stage.height // f, stage.width // f, self.layout.patch_degree,
                             self.spec.downsample_factor)

    def make_solver(self, req: Request, stage: Stage | None = None):
        """The solver of the one-stage schedule of `req`, or of `stage`: its own grid of stage.steps
        steps, shifted by stage.shift, started at the step its strength enters at."""
        sched = dict(self.spec.schedule)
        kind = sched.pop("kind")
        if stage is None:
            return make_solver(req.solver, make_schedule(kind, **sched), num_steps=req.steps, **req.solver_options)
        if stage.shift is not None:
            sched.pop("image_seq_len", None)
            sched["shift"] = stage.shift
        schedule = make_schedule(kind, **sched)
        solver = make_solver(req.solver, schedule, num_steps=stage.steps, **req.solver_options)
        start = start_step(solver.n_grid, stage.strength)     # a step is one model evaluation
        if start == 0:
            return solver
        return make_solver(req.solver, schedule, num_steps=stage.steps, **{**req.solver_options, "start_index": start})

    def stage_plan(self, req: Request) -> tuple[tuple[Stage, ...], list, list[str], list[int]]:
        """The request's stages, their solvers, how each is entered (parafuse.stages.entry) and the
        model evaluations each runs (a stage that hands its noisy sample over skips its last)."""
        stages = self.stages(req)
        solvers = [self.make_solver(req, st) for st in stages]
        entries = ["noise"] + [entry(stages[i - 1], stages[i], solvers[i - 1], solvers[i], self.spec.codec(),
                                     self.spec.codec_factor) for i in range(1, len(stages))]
        evals = [s.num_evals - (1 if i + 1 < len(stages) and entries[i + 1] == "noisy" else 0)
                 for i, s in enumerate(solvers)]
        return stages, solvers, entries, evals

    def _branches(self, req: Request) -> tuple[dict, dict | None]:
        """Model keyword arguments of the conditional and unconditional branch, batched."""
        b, dev, spec = req.batch, self.device, self.spec
        if spec.num_classes:
            label = 0 if req.label is None else req.label
            return ({"class_labels": torch.full((b,), label, dtype=torch.long, device=dev)},
                    {"class_labels": torch.full((b,), spec.num_classes, dtype=torch.long, device=dev)})
        if spec.context_dim:
            ctx = req.context if req.context is not None else torch.zeros(1, 1, spec.context_dim)
            ctx = ctx.to(dev, self.dtype).expand(b, -1, -1)
            return {"context": ctx}, {"context": torch.zeros_like(ctx)}
        return {}, None

    def _model_fn(self, req: Request):
        """The denoiser as the solver sees it: float32 in and out, the model in its own dtype.

        The timestep reaches the model as a device tensor updated in place before each evaluation,
        so that the evaluation itself reads no host value and takes no new input tensor: two
        evaluations differ only in the data in their (fixed) input tensors - what a CUDA graph of
        the evaluation needs (`parafuse.graphs`)."""
        cond, uncond = self._branches(req)
        dt, engine = self.dtype, self.engine
        timestep = torch.zeros((), dtype=torch.float32, device=self.device)

        def model(x, t, **kw):
            out = self.model(x.to(dt), t, **kw)
            if engine is not None:
                engine.gather_output(out)     # the baselines' per-step all-gather; nothing in parafuse's modes
            return out

        if self._fused_guidance(req):       # [cond; uncond] as the model made them: the fused update guides
            stacked = {k: torch.cat([cond[k], uncond[k]]) for k in cond}

            def evaluate(x):
                return model(torch.cat([x, x]), timestep, **stacked)
        elif not self.parallel.cfg_parallel:
            both = guided(lambda x, t, **kw: model(x, t, **kw).float(), req.guidance, cond, uncond)

            def evaluate(x):
                return both(x, timestep)
        else:
            mine = cond if self.layout.branch == 0 else uncond
            peer = self.layout.cfg_peer

            def evaluate(x):
                out = model(x, timestep, **mine)   # the other branch's strip travels in the compute dtype
                other = torch.empty_like(out)
                self.transport.start([(out, peer)], [(other, peer)], "cfg").wait()
                c, u = (out, other) if self.layout.branch == 0 else (other, out)
                return cfg(c.float(), u.float(), req.guidance)

        graphs = self.session.graphs(evaluate)
        if graphs is None:
            run = evaluate
        else:
            def run(x):
                if self.engine is None:
                    return graphs("serial", x)
                if self.engine.step is not self.engine.plan.stale_step:
                    return evaluate(x)          # warmup steps run once each: not worth a graph
                return graphs(self.engine.step.name, x)

        def fn(x, t):
            timestep.fill_(t)
            return run(x)
        return fn

    def _fused_guidance(self, req: Request) -> bool:
        """Guidance applied by the fused update (--kernels triton): the model function then returns
        both branches stacked. Not with CFG parallel, where the branches live on two ranks."""
        return self.kernels == Kernels.TRITON and req.guidance != 1.0 and self.conditional and not self.parallel.cfg_parallel

    def model_batch(self, req: Request) -> int:
        """Samples per model evaluation on this rank: both guidance branches unless CFG-parallel."""
        both = req.guidance != 1.0 and not self.parallel.cfg_parallel
        return req.batch * (2 if both else 1)

    def plan(self, geometry: StripGeometry, batch: int) -> PatchPlan:
        return self.session.plan(self.profile.sites, geometry, batch)

    # ---- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, req: Request, progress: bool = False) -> Result:
        geometry = self.check(req)
        self.session.check_same_call(self.call_values(req), "the request")
        run = Denoising(self, req, progress)
        self.session.reset_counts()
        start = time.perf_counter()
        with self.session.guard(f"denoising {req.width}x{req.height}"):
            x = denoise_stages(run.solvers, run.initial_latent(), run.start_stage, run.change_stage,
                               StripReduce(self.engine) if self.engine is not None else LocalReduce(),
                               run.before_step, run.after_step, [e == "noisy" for e in run.entries])
            x = run.finish(x, geometry)
        step_seconds = run.clock.seconds()        # waits for the device once, at the end
        total = time.perf_counter() - start
        run.close()

        image = latent = None
        if self.layout.rank == 0:
            latent = x.float().cpu()
            image = self.spec.codec().decode(latent).clamp(-1, 1)
        timing = {"total_seconds": total, "step_seconds": step_seconds,
                  "flops": {"total": sum(self.eval_flops(req, g) * n for g, n in zip(run.geometries, run.evals)),
                            "full_schedule": self.eval_flops(req, geometry) * req.steps},   # a step is one evaluation
                  "stages": stage_report(run.stages, run.solvers, run.evals, run.entries, step_seconds,
                                         run.change_seconds)}
        stats = self.session.rank_stats(geometry.rows[self.layout.patch_index], run.state_bytes, sum(run.evals))
        return Result(image, latent, stats, timing)

    def call_values(self, req: Request) -> dict:
        """What must be the same on every rank for `req`: the resolved request, the parallel
        settings, the model, dtype, kernels, attention backend, CUDA graphs and the weights file."""
        values = {f"request.{f.name}": getattr(req, f.name) for f in fields(req)}
        values.update({f"parallel.{k}": v for k, v in config_settings(self.config).items()})
        values.update({"model": self.spec.name, "dtype": self.config.dtype, "kernels": self.kernels,
                       "attention backend": self.attention_backend, "cuda graphs": self.cuda_graphs,
                       "weights file (size, header hash)": self.weights})
        return values

    def eval_flops(self, req: Request, geometry: StripGeometry) -> float:
        """FLOPs of one model evaluation of the whole image at `geometry`: both guidance branches
        count, whether batched on one rank or split across a CFG pair."""
        return self.profile.flops(geometry.height, geometry.width, req.batch) * (2 if req.guidance != 1.0 else 1)

    @torch.no_grad()
    def rank_step(self, req: Request):
        """This rank's model evaluation in the steady state, for measuring: runs the synchronous
        steps of `req` once (filling the stale buffers), then returns a function that runs one
        evaluation under the stale step plan (the sync plan in `sync` mode) each time it is called
        (at the request's first timestep, or the one it is given).
        With a `NullTransport` it measures one rank's compute alone."""
        geometry = self.check(req)
        solver = self.make_solver(req)
        rows = geometry.row_range(self.layout.patch_index)
        shape = (req.batch, self.spec.latent_channels, geometry.height, geometry.width)
        x = (solver.init_noise_sigma * initial_noise(req.seed, shape, rows)).to(self.device)
        fn, t = self._model_fn(req), solver.model_time(0)
        if self.engine is not None:
            self.engine.configure(self.plan(geometry, self.model_batch(req)), self.device)
            for step in range(max(1, self.parallel.warmup_steps)):
                self.engine.begin_step(step)
                fn(x, t)
            self.engine.begin_step(max(1, self.parallel.warmup_steps))

        @torch.no_grad()
        def step(timestep: float | None = None):
            if self.engine is not None:
                self.engine.begin_step(max(1, self.parallel.warmup_steps))
            return fn(x, t if timestep is None else timestep)
        return step

    def gather_rank_stats(self, result: Result) -> list[dict] | None:
        """Every rank's stats on rank 0 (torch.distributed runs); None on the others."""
        return self.session.gather_rank_stats(result.rank_stats)

    def close(self) -> None:
        self.session.close()


class Denoising:
    """One request's denoising on this rank, in the steps `denoise_stages` calls: its stages with
    their geometries and solvers (fixed before the first step), the stage start and change, what
    runs around each evaluation (the plan's step, the clock, the finite-value watch, the progress
    bar), and the end (the image's strips gathered on rank 0)."""

    def __init__(self, runtime: Runtime, req: Request, progress: bool):
        self.rt, self.req = runtime, req
        self.stages, solvers, self.entries, self.evals = runtime.stage_plan(req)
        self.geometries = [runtime.stage_geometry(st) for st in self.stages]
        if runtime.kernels == Kernels.TRITON:     # the solver update (and guidance) as one fused launch per evaluation
            from parafuse_kernels.update import FusedUpdate
            guidance = req.guidance if runtime._fused_guidance(req) else None
            solvers = [FusedUpdate(s, guidance) for s in solvers]
        self.solvers = solvers
        evals = sum(self.evals)
        lay = runtime.layout
        self.bar = None
        if progress and lay.rank == 0:
            from tqdm import tqdm
            self.bar = tqdm(total=evals, desc=f"denoising {req.height}x{req.width}", unit="step")
        self.clock = StepClock(runtime.device)
        self.watch = runtime.session.watch(evals)
        self.change_seconds = [0.0] * len(self.stages)
        self.state_bytes = 0        # the most the engine held between steps, over the stages

    def _strip_noise(self, stage: int) -> torch.Tensor:
        """Noise of stage `stage`'s whole latent keyed by (seed, stage), this rank's strip of it."""
        req, g = self.req, self.geometries[stage]
        shape = (req.batch, self.rt.spec.latent_channels, g.height, g.width)
        rows = g.row_range(self.rt.layout.patch_index)
        return initial_noise(stage_seed(req.seed, stage), shape, rows).to(self.rt.device)

    def initial_latent(self) -> torch.Tensor:
        return self.solvers[0].init_noise_sigma * self._strip_noise(0)

    def start_stage(self, i: int):
        """Stage i's model function. A new geometry is a new patch plan: fresh buffers, and the
        stage's first step runs sync."""
        engine = self.rt.engine
        if engine is not None:
            if i > 0:                       # what the previous stage held between its steps
                self.state_bytes = max(self.state_bytes, engine.state_bytes())
            engine.configure(self.rt.plan(self.geometries[i], self.rt.model_batch(self.req)), self.rt.device)
        return self.watch.wrap(self.rt._model_fn(self.req))

    def change_stage(self, i: int, handed: torch.Tensor) -> torch.Tensor:
        """Stage i's starting sample from what stage i−1 handed over (its noisy sample or its x̂0,
        self.entries[i]): the old geometry's strips gathered, the whole latent resized, this rank's
        strip of it brought to stage i's starting σ with noise keyed by (seed, stage)."""
        t0 = time.perf_counter()
        engine, old, new, codec = self.rt.engine, self.geometries[i - 1], self.geometries[i], self.rt.spec.codec()
        if engine is not None:
            engine.drain()
            handed = engine.gather_rows(handed, 2, old.rows, kind="stage")
        whole = resize_latent(handed, new.height, new.width, codec, self.req.upsample)
        r = new.row_range(self.rt.layout.patch_index)
        solver = self.solvers[i]
        if self.entries[i] == "noisy":
            before, k = self.solvers[i - 1], self.evals[i - 1]
            var = carried_variance((old.height, old.width), (new.height, new.width), codec)[:, :, r[0]:r[1]]
            x = enter_noisy(whole[:, :, r[0]:r[1]], before.sigma(k), before.alpha(k), solver.sigma(0),
                            solver.alpha(0), var, self._strip_noise(i)).to(handed.dtype)
        else:
            x = solver.add_noise(whole[:, :, r[0]:r[1]], self._strip_noise(i))
        self.change_seconds[i] = time.perf_counter() - t0
        return x

    def before_step(self, k: int) -> None:
        self.watch.begin(k)
        self.rt.session.begin_step(k)       # a step is one model evaluation, for every solver
        self.clock.start()

    def after_step(self, k: int) -> None:
        self.clock.stop()
        if self.rt.engine is not None:      # the step's GroupNorm statistics, for the finite-value watch
            self.rt.engine.check_statistics()
        if self.bar is not None:
            self.bar.update(1)

    def finish(self, x: torch.Tensor, geometry: StripGeometry) -> torch.Tensor:
        """After the last step: every rank raises the same NonFiniteError before anything is
        gathered; then the strips are gathered on rank 0 (the whole latent there, the strip elsewhere)."""
        self.watch.finish(x)
        engine = self.rt.engine
        if engine is None:
            return x
        self.state_bytes = max(self.state_bytes, engine.state_bytes())
        engine.drain()
        if self.rt.layout.branch == 0:      # both CFG branches hold the same strips; one gather suffices
            x = engine.gather_rows(x, 2, geometry.rows, dst=0)
        return x

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def emulate(model: nn.Module, world_size: int, parallel: PatchConfig, requests, device: str = "cpu",
            on_rank=None, dtype=None, strict: bool = True, kernels: str = "torch", link=None):
    """Run `requests` (one Request or a list) on `world_size` emulated ranks (threads of this
    process, `parafuse.parallel.emulator`), each with its own copy of `model`; `link` (latency s,
    bandwidth B/s): a modelled link (ThreadHub).

    Returns (runtimes, results): per rank, its Runtime and its list of Results (in request order).
    `on_rank(runtime)` is called in each rank's thread after set-up (tests use it to add hooks)."""
    import copy

    requests = requests if isinstance(requests, (list, tuple)) else [requests]
    runtimes: list = [None] * world_size
    results: list = [None] * world_size

    def run(layout: ParallelLayout, transport):
        rt = Runtime(copy.deepcopy(model), parallel, device, layout=layout, transport=transport, dtype=dtype,
                     kernels=kernels)
        runtimes[layout.rank] = rt
        if on_rank is not None:
            on_rank(rt)
        results[layout.rank] = [rt.generate(r) for r in requests]
        rt.close()

    emulate_ranks(world_size, parallel, run, device, strict, link)
    return runtimes, results
