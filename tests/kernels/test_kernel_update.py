"""The fused solver update (parafuse_kernels.update) against the solvers' own eager steps, through the
Triton interpreter on CPU (conftest.py sets TRITON_INTERPRET=1 before any kernel module is imported).

Every solver of the registry (and the option variants that change its history), eps / v / flow
prediction, with and without classifier-free guidance fused into the kernel, thresholding and
guidance rescale (global reductions done in torch around the kernel): a whole trajectory of random
"model outputs" (a fixed random linear function of x, never zero) must follow the eager one.
Tolerance: 2e-5 relative to the trajectory's scale in fp32 (the fused path composes the
coefficients in float64 and rounds once; the eager one rounds x̂0 first); in bf16, x_next within
one bf16 rounding of the eager step from the same input."""
import pytest
import torch

from parafuse.solvers import SOLVERS, make_schedule, make_solver
from parafuse.solvers.linear import linear_step
from parafuse_kernels import update as ku

SCHEDULES = {"eps": ("vp", {"prediction": "eps"}), "v": ("vp", {"prediction": "v"}), "flow": ("flow", {"shift": 3.0})}
VARIANTS = [(name, {}) for name in SOLVERS] + [("dpmpp-3m", {"variant": "taylor"}), ("unipc-bh2", {"order": 3}),
                                               ("ghvb", {"order": 4}), ("dpmpp-2m-hb", {"beta": 0.5})]
SHAPE = (1, 3, 5, 7)          # 105 elements: not a multiple of the block


def make(name, opts, prediction, steps=6, **kw):
    kind, sched = SCHEDULES[prediction]
    return make_solver(name, make_schedule(kind, **sched), num_steps=steps, **opts, **kw)


def outputs(x, k, guided=False):
    """A deterministic, non-trivial 'model': mixes x with a fixed random field (per branch)."""
    g = torch.Generator().manual_seed(100 + k)
    field, field_u = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    cond = 0.7 * x.float() + field
    return (cond, 0.5 * x.float() + field_u) if guided else (cond, None)


def trajectories(solver, x, guidance=None, guidance_rescale=0.0):
    eager_x, fused_x = x.clone(), x.clone()
    eager_state, fused_state = solver.init_state(), solver.init_state()
    for k in range(solver.num_evals):
        cond, uncond = outputs(eager_x, k, guidance is not None)
        eager_x, eager_state = ku.fused_step_reference(solver, k, eager_x, cond, eager_state, uncond=uncond,
                                                       guidance=guidance or 1.0, guidance_rescale=guidance_rescale)
        cond, uncond = outputs(fused_x, k, guidance is not None)
        before = ku.LAUNCHES["fused_update"]
        fused_x, fused_state = ku.fused_step(solver, k, fused_x, cond, fused_state, uncond=uncond,
                                             guidance=guidance or 1.0, guidance_rescale=guidance_rescale)
        assert ku.LAUNCHES["fused_update"] == before + 1        # one launch per evaluation: the kernel ran
        yield eager_x, fused_x, eager_state, fused_state


def start(seed=0, dtype=torch.float32):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("name, opts", VARIANTS, ids=[n + "".join(f"-{v}" for v in o.values()) for n, o in VARIANTS])
@pytest.mark.parametrize("prediction", ["eps", "v", "flow"])
def test_every_solver_follows_its_eager_trajectory(name, opts, prediction):
    solver = make(name, opts, prediction)
    for eager, fused, es, fs in trajectories(solver, start()):
        scale = eager.abs().max().item() + 1e-3
        torch.testing.assert_close(fused, eager, rtol=0, atol=2e-5 * scale)
        assert sorted(es) == sorted(fs)


@pytest.mark.parametrize("name", ["dpmpp-2m", "unipc-bh2", "deis-3m", "dpmpp-2s"])
def test_guidance_is_fused(name):
    solver = make(name, {}, "flow")
    step = linear_step(solver, 0, solver.init_state(), guidance=4.0)
    assert {"cond", "uncond"} <= set(step.sources)              # both branches read by the kernel itself
    for eager, fused, *_ in trajectories(solver, start(), guidance=4.0):
        torch.testing.assert_close(fused, eager, rtol=0, atol=2e-5 * (eager.abs().max().item() + 1e-3))


@pytest.mark.parametrize("name", ["dpmpp-2m", "unipc-bh2"])
def test_thresholding_and_guidance_rescale_are_applied(name):
    """Global reductions run in torch around the kernel, never skipped: the result differs from the
    run without them and equals the eager run with them."""
    solver = make(name, {}, "eps", thresholding=True, sample_max_value=1.5)
    plain = make(name, {}, "eps")
    x = start(2) * 3.0
    last = None
    for eager, fused, *_ in trajectories(solver, x, guidance=5.0, guidance_rescale=0.7):
        torch.testing.assert_close(fused, eager, rtol=0, atol=2e-5 * (eager.abs().max().item() + 1e-3))
        last = fused
    *_, (without, *_) = trajectories(plain, x, guidance=5.0)
    assert (last - without).abs().max() > 1e-2


def test_bf16_storage_fp32_history():
    """From the same bf16 x and float32 history at every step of the eager run: x_next within one
    bf16 rounding of the eager one, the new history in float32 to 2e-5."""
    solver = make("dpmpp-3m", {}, "flow")
    x, state = start(3, torch.bfloat16), solver.init_state()
    for k in range(solver.num_evals):
        raw, _ = outputs(x, k)
        fused, fused_state = ku.fused_step(solver, k, x, raw, state)
        x, state = solver.step(k, x, raw, state)
        assert fused.dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in fused_state["x0s"])
        torch.testing.assert_close(fused.float(), x.float(), rtol=1 / 128, atol=1e-3)
        for a, b in zip(fused_state["x0s"], state["x0s"]):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_linear_update_kernel_against_its_reference():
    g = torch.Generator().manual_seed(7)
    srcs = [torch.randn(1000, generator=g), torch.randn(1000, generator=g).bfloat16(),
            torch.randn(1000, generator=g).half()]
    rows = [[0.5, -1.25, 2.0], [1.0, 0.0, -3.0]]
    outs = [torch.empty(1000), torch.empty(1000, dtype=torch.bfloat16)]
    refs = [torch.empty(1000), torch.empty(1000, dtype=torch.bfloat16)]
    ku.linear_update(srcs, outs, rows)
    ku.linear_update_reference(srcs, refs, rows)
    torch.testing.assert_close(outs[0], refs[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs[1].float(), refs[1].float(), rtol=1 / 128, atol=0)
    with pytest.raises(ValueError, match="contiguous"):
        ku.linear_update([torch.randn(10, 10).t()], [torch.empty(10, 10)], [[1.0]])


def test_runtime_with_triton_kernels_runs_the_fused_update():
    """`Runtime(kernels="triton")` steps the solver through the fused kernel (one launch per
    evaluation, guidance included: the model function hands it both branches) and gives the image
    of the PyTorch path."""
    from parafuse.models import load_model
    from parafuse.runtime import ParallelConfig, Request, Runtime

    req = Request(32, 32, 3, "dpmpp-2m", seed=1, label=1, guidance=3.0)
    before = ku.LAUNCHES["fused_update"]
    rt = Runtime(load_model("dit-small"), ParallelConfig(), kernels="triton")
    assert rt._fused_guidance(req)                  # the kernel reads both branches and guides
    fused = rt.generate(req).latent
    assert ku.LAUNCHES["fused_update"] == before + 3
    eager = Runtime(load_model("dit-small"), ParallelConfig()).generate(req).latent
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


def test_bottleneck_schedule_with_triton_kernels_equals_the_pytorch_path():
    """The fused update wraps each stage's solver: the noisy hand-over (the wrapped solver's σ and α)
    and the x̂0 one (its guided data prediction) must give the PyTorch path's latent."""
    from parafuse.models import load_model
    from parafuse.runtime import ParallelConfig, Request, Runtime

    req = Request(64, 64, 20, "dpmpp-2m", seed=2, label=1, guidance=3.0, schedule="bottleneck")
    before = ku.LAUNCHES["fused_update"]
    fused = Runtime(load_model("dit-small"), ParallelConfig(), kernels="triton").generate(req)
    assert ku.LAUNCHES["fused_update"] == before + sum(s["evaluations"] for s in fused.timing["stages"])
    eager = Runtime(load_model("dit-small"), ParallelConfig(), kernels="torch").generate(req)
    assert [s["entry"] for s in fused.timing["stages"]] == ["noise", "noisy", "clean"]
    assert fused.timing["stages"] == [{**s, "seconds": f["seconds"], "change_seconds": f["change_seconds"]}
                                      for s, f in zip(eager.timing["stages"], fused.timing["stages"])]
    torch.testing.assert_close(fused.latent, eager.latent, rtol=1e-5, atol=1e-5)
