"""Triton kernels of parafuse, each beside its plain-PyTorch reference.

Import kernel modules lazily: TRITON_INTERPRET=1 (CPU testing) is read when `@triton.jit`
decorates a kernel, so it must be set before a kernel module is imported.
"""
