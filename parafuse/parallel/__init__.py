"""Patch parallelism: strips of the latent across ranks, exchanging only what neighbours need.

geometry     rows each rank owns at every level, halo sizes (pure functions)
adapter      which modules of a model family are parallel sites, by type and behaviour
plan         the patch plan: every site's level, halo, K/V window and buffer shapes for one
             geometry, and the step plans (sync / stale / local) - pure, no tensors
transport    moves tensors between ranks and counts every byte (torch.distributed, threads with
             NCCL's rules, a NullTransport that moves nothing, a LoopbackTransport of device copies)
kv_codec     one-bit stale K/V: sign of the residual against a predicted mirror, with error feedback
engine       executes the plan: the exchange logic every patch layer calls (halos, K/V buffers,
             GroupNorm statistics), with the buffers the plan fixes
layers       patch-aware Conv2d / GroupNorm / self-attention / grid positions
parallelize  swaps those layers into an unmodified model (and back)
"""
