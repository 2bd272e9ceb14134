"""The stale text merge's messages in the compute dtype (ExchangeEngine.merge_text): each strip's
partial output travels in the model's dtype, its log-sum-exps in float32; what that costs against
float32 partial outputs, and the bytes it sends."""

import pytest
import torch

from parafuse.diffusers.adapter import partial_attention
from parafuse.parallel.config import PatchConfig
from parafuse.parallel.emulator import run_ranks
from parafuse.parallel.engine import ExchangeEngine, merge_partials
from parafuse.parallel.geometry import StripGeometry
from parafuse.parallel.plan import PatchPlan, Site
from parafuse.parallel.transport import ThreadHub, ThreadTransport


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compute_dtype_partials_cost_no_more_than_the_cast_that_follows(dtype):
    """Flux's text queries (24 heads x 128, 512 tokens) over 4 strips of 256 image keys, scores of
    sd 4: merging partial outputs rounded to bf16/fp16 is off the float32-partials merge by about
    what casting that merge to the dtype (which the attention processor does next) costs: rms
    within 1.1x, max within 2x. Rounding the log-sum-exps too would be off by far more."""
    g = torch.Generator().manual_seed(0)
    q = 2 * torch.randn(1, 24, 512, 128, generator=g)
    parts = [partial_attention(q, 2 * torch.randn(1, 24, 256, 128, generator=g), torch.randn(1, 24, 256, 128, generator=g))
             for _ in range(4)]
    outs, lses = [o for o, _ in parts], [lse for _, lse in parts]
    ref = merge_partials(outs, lses)
    cast = ref.to(dtype).float() - ref
    err = merge_partials([o.to(dtype) for o in outs], lses) - ref
    assert err.pow(2).mean().sqrt() <= 1.1 * cast.pow(2).mean().sqrt()
    assert err.abs().max() <= 2 * cast.abs().max()
    lse_rounded = merge_partials([o.to(dtype) for o in outs], [lse.to(dtype).float() for lse in lses]) - ref
    assert lse_rounded.abs().max() > 5 * cast.abs().max()


def test_stale_merge_sends_the_output_in_the_compute_dtype_and_the_lse_in_float32():
    """bf16 plan, 3 emulated ranks, head dim 3 (a message of 30 bytes: the buffer's rows are padded
    to 32, only 30 travel): every step sends each peer B x heads x L x (4 + 2d) bytes; synchronous
    steps merge every strip's rounded partials (the same bits on every rank), stale steps this
    strip's fresh one with the others' of the previous step, all rounded to bf16 and lse float32."""
    n, steps, batch, heads, text, d, image = 3, 4, 1, 1, 3, 3, 5
    g = torch.Generator().manual_seed(7)
    inputs = [(torch.randn(batch, heads, text, d, generator=g),
               [torch.randn(2, batch, heads, image, d, generator=g) for _ in range(n)]) for _ in range(steps)]
    site = Site("attn", "attn", 1, heads * d, heads=heads, text=text)
    hub, results, engines = ThreadHub(n), [[] for _ in range(n)], [None] * n

    def body(rank):
        config = PatchConfig(mode="full", warmup_steps=2, text_merge="stale")
        engine = engines[rank] = ExchangeEngine(ThreadTransport(rank, hub), list(range(n)), config)
        plan = PatchPlan([site], StripGeometry(image * n, 1, n, 1), rank, batch, torch.bfloat16, engine.settings)
        engine.configure(plan, torch.device("cpu"))
        for step, (q, kv) in enumerate(inputs):
            engine.begin_step(step)
            results[rank].append(engine.merge_text("attn", *partial_attention(q, kv[rank][0], kv[rank][1]))())
        engine.drain()

    run_ranks(hub, body)

    def merged(parts):                   # parts: [(q, k, v)] per strip; outputs rounded as sent
        partial = [partial_attention(q, k, v) for q, k, v in parts]
        return merge_partials([o.to(torch.bfloat16) for o, _ in partial], [lse for _, lse in partial])

    for step, (q, kv) in enumerate(inputs):
        for rank in range(n):
            if step < 2:
                want = merged([(q, k, v) for k, v in kv])
                assert torch.equal(results[rank][step], results[0][step])
            else:
                prev_q, prev_kv = inputs[step - 1]
                want = merged([(q, *kv[j]) if j == rank else (prev_q, *prev_kv[j]) for j in range(n)])
            assert results[rank][step].dtype == torch.float32
            assert torch.equal(results[rank][step], want), (step, rank)
    message = batch * heads * text * (4 + 2 * d)
    assert message == 30 and engines[0].buffers["attn"]["text"].shape == (n, 32)
    for e in engines:
        assert dict(e.transport.bytes_sent["text_attn"]) == {j: steps * message for j in range(n) if j != e.strip}
        assert e.transport.messages_sent["text_attn"] == steps * (n - 1)


def test_exact_merge_all_reduces_the_output_in_the_compute_dtype():
    """bf16 plan, 3 emulated ranks, exact merge: each strip's output is reweighted by its share of
    the whole softmax in float32, rounded to bf16 and summed in rank order (the emulator's
    all-reduce, as NCCL's ring sums in the tensor's dtype): the same bits on every rank, within
    the cast-cost bound of the float32 merge, and B x heads x L x d x 2 bytes all-reduced besides
    the float32 log-sum-exps all-gathered."""
    from parafuse.parallel.transport import ring_bytes, sum_in_rank_order

    n, batch, heads, text, d, image = 3, 1, 2, 4, 8, 5
    g = torch.Generator().manual_seed(3)
    q = 2 * torch.randn(batch, heads, text, d, generator=g)
    kv = [(2 * torch.randn(batch, heads, image, d, generator=g), torch.randn(batch, heads, image, d, generator=g))
          for _ in range(n)]
    site = Site("attn", "attn", 1, heads * d, heads=heads, text=text)
    hub, results, engines = ThreadHub(n), [None] * n, [None] * n

    def body(rank):
        config = PatchConfig(mode="full", warmup_steps=1, text_merge="exact")
        engine = engines[rank] = ExchangeEngine(ThreadTransport(rank, hub), list(range(n)), config)
        plan = PatchPlan([site], StripGeometry(image * n, 1, n, 1), rank, batch, torch.bfloat16, engine.settings)
        engine.configure(plan, torch.device("cpu"))
        engine.begin_step(0)
        results[rank] = engine.merge_text("attn", *partial_attention(q, *kv[rank]))()
        engine.drain()

    run_ranks(hub, body)
    partial = [partial_attention(q, k, v) for k, v in kv]
    total = torch.logsumexp(torch.stack([lse for _, lse in partial]), 0)
    want = sum_in_rank_order([(o * torch.exp(lse - total)[..., None]).to(torch.bfloat16) for o, lse in partial])
    ref = merge_partials([o for o, _ in partial], [lse for _, lse in partial])
    for rank in range(n):
        assert results[rank].dtype == torch.bfloat16
        assert torch.equal(results[rank], want), rank
    cast = ref.to(torch.bfloat16).float() - ref
    assert (want.float() - ref).abs().max() <= 3 * cast.abs().max()
    lse_bytes, out_bytes = batch * heads * text * 4, batch * heads * text * d * 2
    for e in engines:
        assert sum(e.transport.bytes_sent["text_attn"].values()) == (n - 1) * lse_bytes + ring_bytes(out_bytes, n)
