"""The steady-state model evaluation is capturable (what a CUDA graph of it needs), checked on CPU:
two consecutive evaluations at different timesteps issue the same operations with the same scalar
arguments on the same persistent tensors (parameters, exchange buffers, the input), read no device
value on the host, and leave no tensor behind that they allocated (state is preallocated by the
patch plan; everything else is a temporary)."""
import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from parafuse.models import load_model
from parafuse.parallel.distributed import ParallelLayout
from parafuse.parallel.transport import NullTransport
from parafuse.runtime import ParallelConfig, Request, Runtime
from support.capture import HOST_READS, Trace

def traced_forward(rt, step, timestep):
    """Trace only the model's forward (the region a graph would capture), not the eager update of
    the timestep tensor before it."""
    trace = Trace()

    def start(module, args):
        trace.produced.add(args[0].untyped_storage().data_ptr())   # the graph's input: a static buffer there
        trace.__enter__()

    def stop(*_):
        trace.__exit__(None, None, None)

    pre = rt.model.register_forward_pre_hook(start)
    post = rt.model.register_forward_hook(stop)
    try:
        out = step(timestep)
    finally:
        pre.remove()
        post.remove()
    out_ptr = out.untyped_storage().data_ptr()
    del out
    gc.collect()
    leaked = [r() for r in trace.new if r() is not None and r().untyped_storage().data_ptr() != out_ptr]
    return trace, leaked


@pytest.mark.parametrize("name", ["unet-small", "dit-small"])
@pytest.mark.parametrize("mode", ["full", "partial"])
def test_steady_state_evaluation_is_capturable(name, mode):
    rt = Runtime(load_model(name), ParallelConfig(mode, warmup_steps=1), layout=ParallelLayout(1, 3),
                 transport=NullTransport(1, 3))
    step = rt.rank_step(Request(96, 64, 4, "ddim", guidance=2.0, label=3))
    first, leaked1 = traced_forward(rt, step, 700.0)
    second, leaked2 = traced_forward(rt, step, 300.0)
    assert len(first.ops) > 50
    assert first.ops == second.ops            # names, scalars and persistent addresses, op by op
    names = {op[0] for op in first.ops}
    assert not names & HOST_READS, names & HOST_READS
    assert not leaked1 and not leaked2, [tuple(t.shape) for t in leaked1 + leaked2]


def test_a_python_timestep_would_not_be_capturable():
    """The check has teeth: a model called with a float timestep builds a new tensor from it."""
    rt = Runtime(load_model("dit-small"), ParallelConfig())
    x = torch.randn(1, rt.spec.latent_channels, 16, 16)
    traces = []
    for t in (700.0, 300.0):
        trace = Trace()
        with trace, torch.no_grad():
            rt.model(x, t, class_labels=torch.tensor([1]))
        traces.append(trace.ops)
    assert traces[0] != traces[1]


def test_cuda_graphs_are_on_by_default_where_a_graph_can_run():
    from parafuse.parallel.config import PatchConfig

    def graphs(device: str, emulated: bool = False) -> bool:
        return PatchConfig(kernels="torch").on(torch.device(device), emulated).cuda_graphs

    assert graphs("cuda")
    assert not graphs("cuda", emulated=True)         # emulated ranks run eagerly
    assert not graphs("cpu") and not graphs("meta")
    assert Runtime(load_model("dit-small"), ParallelConfig(), device="cpu").cuda_graphs is False


def test_a_failed_capture_says_how_to_run_without_graphs(monkeypatch):
    from contextlib import contextmanager

    from parafuse.graphs import CaptureError, GraphedEvaluations

    @contextmanager
    def failing_capture(graph, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing")
        yield

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", failing_capture)
    run = GraphedEvaluations(lambda x: 2 * x)
    x = torch.ones(3)
    assert torch.equal(run("stale", x), 2 * x)           # the first evaluation under a plan is eager
    with pytest.raises(CaptureError, match="step plan 'stale'.*not permitted.*--no-cuda-graphs"):
        run("stale", x)
