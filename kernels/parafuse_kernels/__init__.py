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

if INTERPRETED:
    # Triton 3.6's interpreter keeps every scalar (a kernel argument, a program id) as a 1-element
    # 1-d array and turns one into a Python int with int(array), which numpy >= 2.4 refuses: a loop
    # over a runtime bound (`range(first, last, BLOCK_N)`, what the compiled kernels pipeline) then
    # fails in the interpreter only. Take the element instead, so that the source the interpreter
    # tests is the source compiled for the GPU.
    from triton.runtime import interpreter as _interpreter

    _patch_lang_tensor = _interpreter._patch_lang_tensor

    def _patch_lang_tensor_scalar_index(tensor, scope):
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interpreter._patch_lang_tensor = _patch_lang_tensor_scalar_index
