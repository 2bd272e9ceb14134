"""A dispatch-mode trace of what a region issues: every ATen op with its scalars and the persistent
tensors it touches, and the tensors it allocates (tests/unit/test_capture.py,
tests/diffusers/test_pipeline_graphs.py); the host reads a region makes; the frames torch.compile
compiles."""
import logging
import re
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

HOST_READS = {"_local_scalar_dense", "item", "equal", "is_nonzero"}


class Trace(TorchDispatchMode):
    """Every op as (name, scalars, persistent tensor addresses); new allocations as weakrefs."""

    def __init__(self):
        super().__init__()
        self.ops, self.new, self.produced = [], [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat, _ = tree_flatten((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}
        scalars, persistent = [], []
        for a in flat:
            if isinstance(a, torch.Tensor):
                ptr = a.untyped_storage().data_ptr()
                persistent.append(None if ptr in self.produced else (ptr, a.data_ptr(), tuple(a.shape)))
            else:
                scalars.append(a)
        self.ops.append((func.overloadpacket.__name__, tuple(map(repr, scalars)), tuple(persistent)))
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs:
                self.produced.add(o.untyped_storage().data_ptr())
                self.new.append(weakref.ref(o))
        return out


class HostReads(TorchDispatchMode):
    """Every op that reads a tensor's value on the host (`HOST_READS`: on a GPU each waits for the
    queued work), counted by its caller: the innermost frame outside torch, as "module:function"
    ("parafuse.diffusers.strips:_before"). The mode is the calling thread's: enter it on each
    emulated rank's thread. On the CPU a copy to the host (`.cpu()`, `.tolist()`) is no op and is
    not seen."""

    def __init__(self):
        super().__init__()
        self.callers: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_READS:
            frame = sys._getframe(1)
            while frame is not None and _module(frame).split(".")[0] == "torch":
                frame = frame.f_back
            caller = "?" if frame is None else f"{_module(frame)}:{frame.f_code.co_name}"
            self.callers[caller] = self.callers.get(caller, 0) + 1
        return func(*args, **(kwargs or {}))


def _module(frame) -> str:
    return frame.f_globals.get("__name__", "?")


class CompiledFrames(logging.Handler):
    """Within `with CompiledFrames() as frames:`, every frame dynamo compiles, as (function, file)
    (a resumed piece after a graph break is its own frame, "torch_dynamo_resume_in_..."), and the
    files of the functions that reached dynamo's recompile limit (run eagerly past it). Read from
    dynamo's own log (torch._dynamo.convert_frame), whose level it sets to DEBUG meanwhile."""

    LOGGER = "torch._dynamo.convert_frame"

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.frames: list[tuple[str, str]] = []
        self.limit_hits: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("torchdynamo start compiling"):
            function, place = message.split()[3:5]
            self.frames.append((function, place.rsplit(":", 1)[0]))
        elif "recompile_limit" in message:
            hit = re.search(r"function: '[^']*' \(([^:]+):", message)
            self.limit_hits.append(hit.group(1) if hit else message)

    def __enter__(self) -> "CompiledFrames":
        logger = logging.getLogger(self.LOGGER)
        self._level = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logger = logging.getLogger(self.LOGGER)
        logger.removeHandler(self)
        logger.setLevel(self._level)

