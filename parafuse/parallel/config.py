"""`PatchConfig`: every parallel setting of a run, validated once, with each rule written once.

Both front doors take it: the built-in models (`parafuse.Runtime`, `python -m parafuse.generate`)
and diffusers pipelines (`parafuse.parallelize(pipe)`); the CLI's flags, choices, defaults and help
come from the fields below (`FIELDS`), so the three cannot drift apart.

    cfg = PatchConfig(mode=Mode.PARTIAL, halo_portion=0.25)   # strings work too: mode="partial"
    cfg.computes      # Mode.PARTIAL: the values a mode computes (a baseline: the mode it reproduces)
    cfg.exchanges     # whether strips exchange anything (partial with p = 0 does not: it is `none`)
    cfg.stale         # whether steady steps use the previous step's exchanges

Settings whose default depends on the mode (the GroupNorm statistics, the text merge, the window)
are filled in `__post_init__`; settings whose default depends on the device (dtype, kernels, CUDA
graphs, attention backend) stay None until `PatchConfig.on(device, emulated)` resolves them, which
a `PatchSession` does when it starts. Every refusal is a `ConfigError` (a ValueError) naming the
setting and what to use instead, raised before any process group, model or compute.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib.util
import math
import os
from dataclasses import dataclass

import torch


class ConfigError(ValueError):
    """Settings that cannot run together; the message says what to change."""


class Mode(enum.StrEnum):
    SYNC = "sync"                 # every exchange fresh: equals the serial model
    FULL = "full"                 # stale K/V of the whole image (DistriFusion's values)
    PARTIAL = "partial"           # stale K/V of a window of each neighbour (PCPP's values)
    NONE = "none"                 # no exchange at all
    DISTRIFUSION = "distrifusion"  # full's values, moved as DistriFusion moves them (all-gathers)
    PCPP = "pcpp"                 # partial's values, with PCPP's all-gathered halos and statistics


class NormMode(enum.StrEnum):
    EXACT = "exact"               # one all-reduce of the strips' sums per GroupNorm, waited on
    CORRECTED = "corrected"       # DistriFusion: last step's global sums, this strip's part fresh
    STALE = "stale"               # last step's global sums
    LOCAL = "local"               # this strip's own statistics


class TextMerge(enum.StrEnum):
    EXACT = "exact"               # joint attention's text queries merged across strips, waited on
    STALE = "stale"               # the other strips' partial outputs of the previous step


class KVCodec(enum.StrEnum):
    NONE = "none"                 # stale K/V sent exactly
    SIGN = "sign"                 # one bit an element (parafuse.parallel.kv_codec)


class Kernels(enum.StrEnum):
    TORCH = "torch"               # PyTorch ops
    TRITON = "triton"             # parafuse_kernels: GroupNorm(+SiLU), the fused solver update, the codec


class AttentionBackend(enum.StrEnum):
    AUTO = "auto"
    TRITON = "triton"
    SDPA = "sdpa"
    XFORMERS = "xformers"
    MATH = "math"                 # the float32 reference, for tests


class Dtype(enum.StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


TORCH_DTYPES = {Dtype.FP32: torch.float32, Dtype.BF16: torch.bfloat16, Dtype.FP16: torch.float16}
BASELINES = {Mode.DISTRIFUSION: Mode.FULL, Mode.PCPP: Mode.PARTIAL}   # baseline -> the mode whose values it computes
DEFAULT_MODE = Mode.FULL
DEFAULT_HALO_PORTION = 0.3        # partial: the share of each neighbour strip whose K/V a strip attends to
DEFAULT_WARMUP_STEPS = 4
MAX_TIMEOUT = 7 * 24 * 3600.0     # a week: beyond it a typo, not a deadline


@dataclass(frozen=True, kw_only=True)
class PatchConfig:
    mode: Mode = DEFAULT_MODE
    warmup_steps: int = DEFAULT_WARMUP_STEPS     # first steps run synchronously (every mode but none)
    halo_portion: float | None = None   # partial/pcpp only: the window; None: DEFAULT_HALO_PORTION there
    # None: exact - one tiny all-reduce per GroupNorm on the critical path buys 14 dB over DistriFusion's
    # corrected-async estimate on the default U-Net at N = 8, 256² (docs/modes.md); corrected for the
    # baselines (as published); local where nothing is exchanged
    norm_mode: NormMode | None = None
    text_merge: TextMerge | None = None  # None: stale where K/V are stale (within 0.03 dB of exact on the
    #                                     tests' SD3 and Flux pipelines, and nothing waited on), exact elsewhere
    kv_codec: KVCodec = KVCodec.NONE
    cfg_parallel: bool = False          # the two guidance branches on two groups of ranks
    dtype: Dtype | None = None          # None: bf16 on CUDA, fp32 elsewhere
    kernels: Kernels | None = None      # None: triton on CUDA, torch elsewhere
    attention_backend: AttentionBackend | None = None   # None: $PARAFUSE_ATTENTION_BACKEND, else auto
    cuda_graphs: bool | None = None     # None: on CUDA unless the ranks are emulated threads
    stale_channel: bool = False         # stale traffic on a second communicator (opt-in: unproven on NCCL)
    startup_timeout: float = 600.0      # seconds a rank may wait for the others to join and start
    exchange_timeout: float = 300.0     # seconds a rank may wait for a neighbour once denoising
    # the mode-dependent settings filled in here rather than given (`replace` fills them again)
    _filled: frozenset = dataclasses.field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.init:
                object.__setattr__(self, f.name, _field_value(f.name, getattr(self, f.name), FIELDS[f.name]))
        self._check_ranges()
        fill = {}
        if self.halo_portion is None and self.windowed:
            fill["halo_portion"] = DEFAULT_HALO_PORTION
        if self.norm_mode is None:
            fill["norm_mode"] = (NormMode.LOCAL if not self._exchanges(fill.get("halo_portion", self.halo_portion))
                                 else NormMode.CORRECTED if self.mode in BASELINES else NormMode.EXACT)
        for k, v in fill.items():
            object.__setattr__(self, k, v)
        if self.text_merge is None:
            fill["text_merge"] = TextMerge.STALE if self.stale else TextMerge.EXACT
            object.__setattr__(self, "text_merge", fill["text_merge"])
        object.__setattr__(self, "_filled", frozenset(fill))
        self._check_together()

    # ---- the rules, each written once ------------------------------------------------------------
    @property
    def computes(self) -> Mode:
        """The mode whose values this mode computes: a baseline's own values are full's or partial's."""
        return BASELINES.get(self.mode, self.mode)

    @property
    def windowed(self) -> bool:
        """Strips attend to a window of their neighbours (partial, pcpp): `halo_portion` applies."""
        return self.computes == Mode.PARTIAL

    def _exchanges(self, halo_portion: float | None) -> bool:
        # partial with p = 0 conditions a strip on nothing of its neighbours: that is `none`
        return self.mode != Mode.NONE and not (self.windowed and halo_portion == 0.0)

    @property
    def exchanges(self) -> bool:
        """Strips exchange anything at all."""
        return self._exchanges(self.halo_portion)

    @property
    def stale(self) -> bool:
        """Steady steps use what the neighbours sent during the previous step (full, partial and
        their baselines, with something exchanged)."""
        return self.computes in (Mode.FULL, Mode.PARTIAL) and self.exchanges

    @property
    def pattern(self) -> str:
        """How data moves: to the neighbours that need it (parafuse), or to every rank (the published
        baselines: all-gathered halos, statistics and model output)."""
        return "all-gather" if self.mode in BASELINES else "neighbours"

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else TORCH_DTYPES[self.dtype]

    def replace(self, **changes) -> "PatchConfig":
        """A copy with `changes`: the settings this config filled from its mode (not those given)
        are filled again for the new one; given settings stay, and are checked against it."""
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return PatchConfig(**{**given, **{k: None for k in self._filled}, **changes})

    # ---- validation ------------------------------------------------------------------------------
    def _check_ranges(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps (--warmup-steps) must be >= 0, got {self.warmup_steps}")
        if self.halo_portion is not None:
            if not 0.0 <= self.halo_portion <= 1.0:
                raise ConfigError(f"halo_portion (--halo-portion) must lie in [0, 1], got {self.halo_portion}")
            if not self.windowed:
                what = "exchanges nothing" if self.mode == Mode.NONE else "attends to the whole image"
                raise ConfigError(f"halo_portion (--halo-portion) sets the window of mode partial (and pcpp); mode "
                                  f"{self.mode.value!r} {what}: leave it out")
        for name in ("startup_timeout", "exchange_timeout"):
            value = getattr(self, name)
            if not 0 < value <= MAX_TIMEOUT:
                raise ConfigError(f"{name} (--{name.replace('_', '-')}) must be a positive number of seconds up to "
                                  f"{MAX_TIMEOUT:.0f}, got {value}")

    def _check_together(self) -> None:
        mode, norm = self.mode, self.norm_mode
        if not self.exchanges and norm != NormMode.LOCAL:
            what = "mode none" if mode == Mode.NONE else f"mode {mode.value} with halo_portion 0"
            raise ConfigError(f"norm_mode {norm.value!r} (--norm) does not apply with {what}: strips exchange "
                              f"nothing, so GroupNorm is local; leave it out or use 'local'")
        if mode == Mode.SYNC and norm != NormMode.EXACT:
            raise ConfigError(f"norm_mode {norm.value!r} (--norm) does not apply with mode sync: every step is "
                              f"synchronous and GroupNorm exact; leave it out or use 'exact'")
        if self.text_merge == TextMerge.STALE and not self.stale:
            raise ConfigError(f"text_merge 'stale' (--text-merge) uses the previous step's partial text outputs: it "
                              f"needs a stale mode (full, partial with a halo portion > 0), not {mode.value!r}")
        if self.kv_codec != KVCodec.NONE and not (self.stale and mode not in BASELINES):
            why = ("moves data as the published system does" if mode in BASELINES else
                   "with halo portion 0 sends none" if mode == Mode.PARTIAL else "sends none")
            raise ConfigError(f"kv_codec {self.kv_codec.value!r} (--kv-codec) encodes the stale K/V that full and "
                              f"partial send; mode {mode.value!r} {why}: use kv_codec 'none', or mode full / partial")

    @property
    def backend_timeout(self) -> float:
        """The process group's own timeout: past both host deadlines (parafuse.watchdog), so that the
        watchdog, which names the rank that stopped, always fires first."""
        return max(self.startup_timeout, self.exchange_timeout) + 60.0

    @property
    def stale_kinds(self) -> tuple[str, ...]:
        """The message kinds the stale channel carries: K/V and conv halos, and the text merge's
        where it is stale (the exact merge shares its kind and is waited on)."""
        from parafuse.parallel.transport import STALE_CHANNEL_KINDS
        return STALE_CHANNEL_KINDS + (("text_attn",) if self.text_merge == TextMerge.STALE else ())

    def channels(self) -> dict:
        """The transport's keyword arguments for this config's channels."""
        return {"stale_channel": self.stale_channel, "stale_kinds": self.stale_kinds}

    # ---- the device's defaults -------------------------------------------------------------------
    def on(self, device: torch.device, emulated: bool = False) -> "PatchConfig":
        """This config with the device-dependent settings resolved for `device` (`emulated`: the
        ranks are threads of one process), and refused where they cannot run there. The attention
        backend is resolved by `parafuse.attention.use_backend`, which knows what is installed."""
        cuda = device.type == "cuda"
        if self.cuda_graphs and emulated:
            raise ConfigError("cuda_graphs (--cuda-graphs) cannot capture emulated ranks (threads sharing one GPU): "
                              "a graph cannot wait on another thread's capture; run the emulator eagerly")
        if self.cuda_graphs and not cuda and device.type != "meta":
            raise ConfigError(f"cuda_graphs (--cuda-graphs) needs a CUDA device; this run is on {device.type}")
        kernels = self.kernels or (Kernels.TRITON if cuda else Kernels.TORCH)
        if kernels == Kernels.TRITON:
            if importlib.util.find_spec("triton") is None:
                raise ConfigError("kernels 'triton' (--kernels, the default on CUDA) needs the triton package; "
                                  "install it or use kernels 'torch'")
            if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
                raise ConfigError(f"kernels 'triton' (--kernels) needs a CUDA device (this run is on {device.type}), "
                                  f"or TRITON_INTERPRET=1 to run them through Triton's interpreter")
        return self.replace(
            kernels=kernels,
            dtype=self.dtype or (Dtype.BF16 if cuda else Dtype.FP32),
            cuda_graphs=(cuda and not emulated) if self.cuda_graphs is None else self.cuda_graphs)


@dataclass(frozen=True)
class Field:
    """How a setting is typed, spelled on the command line and explained (`add_arguments`)."""
    kind: type | tuple                   # an Enum, int, float or bool
    help: str
    group: str = "parallel"              # the --help group
    flag: str | None = None              # the command-line flag, where not --NAME-WITH-DASHES

    def option(self, name: str) -> str:
        return self.flag or "--" + name.replace("_", "-")


FIELDS = {
    "mode": Field(Mode, "patch exchange: sync (exact), full (stale K/V of the whole image), partial (stale K/V of "
                        "a window of each neighbour), none (no exchange); distrifusion and pcpp: the published "
                        "systems' communication on the same model"),
    "warmup_steps": Field(int, "first steps run synchronously (every mode but none)"),
    "halo_portion": Field(float, f"partial and pcpp: the portion of each neighbour strip whose K/V a strip attends "
                                 f"to (default {DEFAULT_HALO_PORTION}; refused for other modes)"),
    "norm_mode": Field(NormMode, "GroupNorm across strips (default: exact; corrected in distrifusion/pcpp, as "
                                 "published; local where nothing is exchanged)", flag="--norm"),
    "text_merge": Field(TextMerge, "diffusers pipelines with joint text+image attention (SD3, Flux, Qwen-Image): how "
                                   "stale steps merge the text queries across strips - stale (the default of full "
                                   "and partial: the previous step's partial outputs) or exact (an all-reduce waited "
                                   "on)"),
    "kv_codec": Field(KVCodec, "stale K/V on the wire (full, partial): none (exact), sign (1 bit an element: the "
                               "sign of the residual against a predicted copy, a scale a token)"),
    "cfg_parallel": Field(bool, "split the two guidance branches across two groups of ranks"),
    "dtype": Field(Dtype, "compute dtype of the model, halos and K/V (default: bf16 on CUDA, fp32 elsewhere); "
                          "statistics and the solver stay float32", "gpu"),
    "kernels": Field(Kernels, "PyTorch ops, or parafuse's Triton kernels: GroupNorm(+SiLU), the solver update, the "
                              "K/V codec (default: triton on CUDA, torch elsewhere)", "gpu"),
    "attention_backend": Field(AttentionBackend, "attention kernels: auto (the fastest measured on this device "
                                                 "class), triton (parafuse's halo attention), sdpa, xformers, "
                                                 "math (the float32 reference, for tests) (default: $PARAFUSE_ATTENTION_BACKEND, else auto)", "gpu"),
    "cuda_graphs": Field(bool, "capture the steady-state denoiser evaluation as a CUDA graph and replay it "
                               "(default: on for CUDA, off elsewhere and for emulated ranks)", "gpu"),
    "stale_channel": Field(bool, "opt-in: stale K/V, stale halos and the stale text merge on a second communicator, "
                                 "so that exact all-reduces and fresh exchanges need not queue behind them (no "
                                 "multi-GPU run has shown NCCL safe with it yet; the thread emulator checks the "
                                 "posting order)"),
    "startup_timeout": Field(float, "seconds a rank may wait for the others while starting", "deadlines"),
    "exchange_timeout": Field(float, "seconds a rank may wait for a neighbour during denoising before the job "
                                     "stops, naming the rank that stopped answering", "deadlines"),
}


def _field_value(name: str, value, field: Field):
    """`value` as the setting's type: an Enum member from its value, numbers checked as numbers
    (bool is not an int, a string is not a number)."""
    if value is None:
        if name in ("halo_portion", "norm_mode", "text_merge", "dtype", "kernels", "attention_backend",
                    "cuda_graphs"):
            return None
        raise ConfigError(f"{name} ({FIELDS[name].option(name)}) must be given, not None")
    kind = field.kind
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        if name == "dtype" and isinstance(value, torch.dtype):
            match = [d for d, t in TORCH_DTYPES.items() if t == value]
            if match:
                return match[0]
        try:
            return kind(value)
        except ValueError:
            raise ConfigError(f"unknown {name} {value!r}; valid: {', '.join(m.value for m in kind)}") from None
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be True or False, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
        return int(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def dtype_name(dtype: torch.dtype) -> Dtype:
    """The setting's name of a torch dtype (ConfigError for a dtype parafuse does not run in)."""
    return _field_value("dtype", dtype, FIELDS["dtype"])


def settings(config: PatchConfig) -> dict:
    """The settings of `config` by name (what a report or a rank comparison records)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}


def defaults() -> dict:
    """Each setting's default as the command line shows it."""
    return {f.name: f.default for f in dataclasses.fields(PatchConfig) if f.init}
