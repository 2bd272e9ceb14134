"""Values of rank 0 shared with every rank (`agreement.tensors_of_rank0`): what a pipeline call
uses to give every rank rank 0's seed and global RNG states."""

import torch

from parafuse.parallel.agreement import tensors_of_rank0
from parafuse.parallel.emulator import run_ranks
from parafuse.parallel.transport import ThreadHub, ThreadTransport


def test_every_rank_gets_rank_zeros_tensors_bit_for_bit():
    """Three ranks, each with its own int64 seed, an odd-length byte state (as an RNG state is
    bytes; 5057 is not a whole number of 8-byte words) and a float tensor with a NaN and a
    negative zero: every rank gets rank 0's, bitwise, in their dtypes and shapes."""
    n = 3
    def own(rank):
        g = torch.Generator().manual_seed(rank)
        floats = torch.randn(2, 3, generator=g)
        floats[0, 0], floats[1, 2] = float("nan"), -0.0
        return [torch.tensor([rank * 2 ** 61 - 1], dtype=torch.int64),
                torch.randint(0, 256, (5057,), dtype=torch.uint8, generator=g), floats]

    hub, got = ThreadHub(n), [None] * n

    def body(rank):
        got[rank] = tensors_of_rank0(own(rank), ThreadTransport(rank, hub))

    run_ranks(hub, body)
    want = own(0)
    assert not torch.equal(own(1)[1], want[1])
    for rank in range(n):
        for a, b in zip(got[rank], want):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), rank


def test_a_recorded_emulator_transport_is_still_emulated():
    """The emulator's ranks are threads of one process whether or not a TimelineRecorder wraps their
    transport (project.py's emulator validation does): the session says so, and resolves CUDA graphs
    off for them (a graph cannot wait on another thread's capture)."""
    from parafuse.parallel.config import PatchConfig
    from parafuse.parallel.distributed import ParallelLayout
    from parafuse.parallel.session import PatchSession
    from parafuse.parallel.transport import TimelineRecorder

    hub = ThreadHub(2)
    session = PatchSession(PatchConfig(mode="full"), device="cpu", layout=ParallelLayout(0, 2, 1),
                           transport=TimelineRecorder(ThreadTransport(0, hub)))
    assert session.emulated
    assert not PatchConfig().on(torch.device("cuda"), emulated=session.emulated).cuda_graphs
