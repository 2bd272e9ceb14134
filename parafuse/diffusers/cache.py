"""diffusers' first-block cache (`transformer.enable_cache(FirstBlockCacheConfig(threshold=...))`)
on a strip of the denoiser, deciding as the whole image decides.

diffusers' cache hooks every transformer block of the model (the block lists its block registry
knows: Flux's, SD3's and PixArt's blocks among the models parafuse splits; a U-Net has none). The
first block's hook compares the first block's output residual r with r_last, the one of the last
step that ran every block: mean |r - r_last| / mean |r_last| against the threshold. Below it, the
other blocks return their input and the first block's output gets the residual the other blocks
added at that last step. The state lives per cache context, which the pipeline's loop sets around
each denoiser call (`cache_context("cond")`): FluxPipeline's does; SD3's and PixArt's do not, and
diffusers fails there ("No cache context is set"), as parafuse refuses before the call computes.
On a strip, r holds this strip's rows alone, so each rank would decide for its own rows: ranks
deciding differently skip different blocks and their exchanges (a hang, or a wrong image).

Both means are over the same number of elements, so their ratio is the ratio of the sums, and
sums add over the strips: each strip sums its rows' |r - r_last| and |r_last| (in float32), the
strips of the patch group sum the pair exactly (`StripReduce.sum`, kind `reduce`: the same bits on
every rank, 8 bytes to each other strip per decision), and every rank takes the whole image's
decision. With cfg_parallel and a pipeline that calls the denoiser once per guidance branch
(Flux's true CFG), each branch's ranks decide for their branch, as diffusers keeps one state per
branch (`cache_context("cond")` / `("uncond")`); without cfg_parallel the two calls are the
denoiser's streams 0 and 1 on every rank, each deciding from its own context's state (diffusers'
state manager, which parafuse's keeps). A batch holding both branches, whose statistic
spans ranks of both, is refused. The cached residuals stay row-local: each strip keeps its own rows.

`StripFirstBlockCache` keeps diffusers' hooks and their state, and gives the head block's hook and
the hooks' state manager parafuse's subclasses for the image (`adopt`), diffusers' classes back
after it (`release`): between pipeline calls and after `close()` they are diffusers' own. The head
hook decides by the reduction, in every mode (mode none too exchanges inside the model: joint
attention's text merge), and by diffusers' own rule where a rank holds its whole image; in the
shape-only runs (the trace, the output shape of a skipped CFG branch) it computes every block and
the state manager hands out a scratch state, so that the fake tensors never enter the cache's
state. A decision read on the host inside the denoiser call cannot
be replayed from one CUDA graph: the cache with parafuse's `cuda_graphs` is refused.

A skipped step posts no exchange for the skipped blocks, and every rank skips the same ones: each
layer's pending exchange (attention K/V, the text merge, a conv halo, GroupNorm sums) is waited
at its next use, as the engine waits every site's (`ExchangeEngine.kv_buffer`, `conv_input`,
`norm_sums`), so the stale data a layer reads in the stale modes is that of the last step it ran.
"""
from __future__ import annotations

import torch

from parafuse.diffusers.adapter import UnsupportedModelError, cache_removal, diffusers_hooks
from parafuse.parallel.reduce import StripReduce

try:
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook, FBCSharedBlockState
    from diffusers.hooks.hooks import StateManager
except ImportError:                    # older diffusers: no first-block cache, no hooks to find
    FBCHeadBlockHook = FBCSharedBlockState = StateManager = type("NoCache", (), {})


class StripHeadHook(FBCHeadBlockHook):
    """diffusers' head-block hook, deciding for the whole image (`cache`: the StripFirstBlockCache)."""

    @torch.compiler.disable
    def _should_compute_remaining_blocks(self, hidden_states_residual: torch.Tensor) -> bool:
        if self.cache.tracing:
            return True                 # the shape-only runs run every block
        previous = self.state_manager.get_state().head_block_residual
        engine = self.cache.strips.engine
        # the reduction in every mode: even mode none exchanges inside the model (joint attention's
        # text merge), so ranks deciding alone could post different exchanges
        if previous is None or engine is None:
            return super()._should_compute_remaining_blocks(hidden_states_residual)
        sums = torch.stack([(hidden_states_residual - previous).abs().sum(dtype=torch.float32),
                            previous.abs().sum(dtype=torch.float32)])
        change, scale = self.cache.reduce.sum(sums)
        # a tensor ratio, as diffusers': a zero residual gives NaN or inf, not a ZeroDivisionError
        return bool(change / scale > self.threshold)


class StripStateManager(StateManager):
    """diffusers' state manager of the cache's hooks (one for all of them); in the shape-only runs a
    scratch state of the image's, so that the fake tensors never enter the cache's state."""

    def get_state(self):
        if not self.cache.tracing:
            return super().get_state()
        if self.cache.scratch is None:
            self.cache.scratch = FBCSharedBlockState()
        return self.cache.scratch


STRIP_CLASSES = {FBCHeadBlockHook: StripHeadHook, StateManager: StripStateManager}


class StripFirstBlockCache:
    """The first-block cache on the strip of `strips` (a StripDenoiser: its model, engine, layout
    and adapter): see the module docstring."""

    def __init__(self, strips):
        self.strips = strips
        self.reduce = None if strips.engine is None else StripReduce(strips.engine)
        self.hooks: list = []         # the head hook and the state manager, parafuse's during an image
        self.scratch = None           # the state of the shape-only runs (fake tensors)

    @property
    def tracing(self) -> bool:
        return self.strips.adapter.tracing

    def adopt(self) -> None:
        """Before an image: the model's first-block cache (enabled before or after parallelize)
        runs with parafuse's head hook and state manager; what cannot run with it is refused here,
        before any compute."""
        self.release()
        found = [h for m in self.strips.layers.modules() for h in diffusers_hooks(m) if type(h) is FBCHeadBlockHook]
        if not found:
            return
        strips = self.strips
        if strips._graphs_on:
            raise UnsupportedModelError(f"diffusers' first-block cache decides on the host, after the first block, "
                                        f"whether the other blocks run, which one CUDA graph of the denoiser call "
                                        f"cannot hold: parallelize with cuda_graphs=False, or {self._removal()}")
        if strips.layout.cfg_degree == 2 and not strips.sequential_cfg:
            raise UnsupportedModelError(f"diffusers' first-block cache decides from the whole CFG batch, whose "
                                        f"guidance branches cfg_parallel puts on different ranks: parallelize with "
                                        f"cfg_parallel=False, or {self._removal()}")
        self.hooks = found + [h.state_manager for h in found]
        for h in self.hooks:
            h.__class__, h.cache = STRIP_CLASSES[type(h)], self

    def release(self) -> None:
        """diffusers' own classes back (after an image, and at `close()`)."""
        for h in self.hooks:
            h.__class__ = type(h).__mro__[1]
            del h.cache
        self.hooks, self.scratch = [], None

    def check_context(self) -> None:
        """At every denoiser call, before it computes: diffusers keeps the cache's state per cache
        context, which the pipeline's loop sets (`cache_context`: FluxPipeline's does); without one
        diffusers fails inside the first block."""
        head = next((h for h in self.hooks if isinstance(h, StripHeadHook)), None)
        if head is None or head.state_manager._context is not None:     # (its `context` raises without one)
            return
        raise UnsupportedModelError(f"diffusers' first-block cache keeps its state per cache context, and "
                                    f"{type(self.strips.layers).__name__} was called outside one (FluxPipeline's "
                                    f"loop sets one with {self.strips.adapter.owner}.cache_context; this caller "
                                    f"does not, and diffusers fails the same way): {self._removal()}")

    def _removal(self) -> str:
        return cache_removal(self.strips.layers, self.strips.adapter.owner)
