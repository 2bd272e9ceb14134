"""Triton kernels of parafuse, each beside its plain-PyTorch reference.

Import kernel modules lazily: TRITON_INTERPRET=1 (CPU testing) is read when `@triton.jit`
decorates a kernel, so it must be set before a kernel module is imported.
"""
import contextlib
import os
import threading

# Triton's interpreter patches its language module while it runs a kernel and keeps the grid in
# module state: threads (the emulator's ranks) must take turns across *all* kernels, so every kernel
# module launches under this one lock. Compiled kernels need none.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
INTERPRETER_LOCK = threading.Lock() if INTERPRETED else contextlib.nullcontext()
