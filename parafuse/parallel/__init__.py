"""Patch parallelism: strips of the latent across ranks, exchanging only what neighbours need.

geometry   rows each rank owns at every level, halo sizes (pure functions)
transport  moves tensors between ranks and counts every byte (torch.distributed, or threads)
engine     the exchange logic every patch layer calls: halos, K/V windows, norm statistics
layers     patch-aware Conv2d / GroupNorm / self-attention / grid positions
parallelize  swaps those layers into an unmodified model
"""
