"""The pipeline door reads no device value on the host per denoiser call.

On a GPU a host read (`.item()`, `torch.equal`, `bool(t)`) waits for all the queued work: the host
loses its lead, and each step's launches (or graph replay) start only after the previous step has
finished on the device. The built-in runtime reads once per `CHECK_EVERY` steps (parafuse.health);
the pipeline door must not add reads per step either. Here every host read of an emulated rank is
counted by its caller (`support.capture.HostReads`) in a pipeline call of 3 and of 6 steps: parafuse's
reads must be the same in both - per image, none per step. Placing a call among its step's calls
(several calls a step: SD3's skip-layer guidance, true CFG) counts the scheduler's steps on the host
(`StripModel._step_position`); an earlier rule compared the call's timestep and latents on the
device at every call, and this test fails on it.
"""
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from support.capture import HostReads  # noqa: E402
from support.diffusers_cases import call_kwargs, flux_true_cfg_kwargs, pipeline_path, slg_kwargs  # noqa: E402

from parafuse.diffusers import load_pipeline  # noqa: E402
from parafuse.diffusers.emulator import emulate_pipeline  # noqa: E402
from parafuse.graphs import rerun_capture  # noqa: E402

# the thread emulator's check that a send buffer is unchanged until its send completes (NCCL's rule,
# enforced here; nothing on NCCL reads it): one read per message, proof that the mode saw the exchanges
EMULATOR_CHECK = "parafuse.parallel.transport:_check_unchanged"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pipelines"))


CASES = {
    # family, the call, settings
    # SD3's skip-layer guidance: two denoiser calls a step (two streams)
    "sd3-slg-full": ("sd3", slg_kwargs, dict(mode="full")),
    "flux-true-cfg-cfg-parallel-partial": ("flux", flux_true_cfg_kwargs,
                                           dict(mode="partial", halo_portion=0.3, cfg_parallel=True, world=4)),
    "sdxl-full-graphed": ("sdxl", lambda: call_kwargs("sdxl"), dict(mode="full", graphed=True)),
    "qwen-partial": ("qwen", lambda: call_kwargs("qwen"), dict(mode="partial", halo_portion=0.3,
                                                               parallel_vae=False)),
}


def reads(pipe, kwargs, steps: int, world: int = 2, graphed: bool = False, **settings) -> dict[str, int]:
    """Rank 0's host reads by caller in one pipeline call of `steps` steps."""
    def call(par):
        if graphed:
            par.strips.graphed, par.session.capture = True, rerun_capture
        counted = HostReads()
        with counted:
            par(**{**kwargs(), "num_inference_steps": steps})
        return counted.callers
    return emulate_pipeline(pipe, world, call, warmup_steps=1, **settings)[0][0]


@pytest.mark.parametrize("case", list(CASES))
def test_the_pipeline_door_reads_no_device_value_per_step(root, case):
    family, kwargs, settings = CASES[case]
    pipe = load_pipeline(pipeline_path(root, family))
    short, long = (reads(pipe, kwargs, steps, **settings) for steps in (3, 6))
    assert long.get(EMULATOR_CHECK, 0) > short.get(EMULATOR_CHECK, 0) > 0      # the mode saw every step

    def parafuse_reads(callers):
        return {c: k for c, k in callers.items() if c.startswith("parafuse.") and c != EMULATOR_CHECK}
    assert parafuse_reads(long) == parafuse_reads(short)
