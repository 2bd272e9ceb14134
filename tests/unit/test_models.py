"""Built-in denoisers: any resolution that is a multiple of their factor, non-zero outputs,
weights round-trip through safetensors, and the shape-only profile."""
import pytest
import torch
from safetensors.torch import save_file

from parafuse.models import MODELS, ModelError, check_weights, get_spec, load_model
from parafuse.profile import ModelProfile


@pytest.mark.parametrize("name", ["unet-small", "dit-small", "unet-small-text", "dit-small-text"])
@pytest.mark.parametrize("size", [(16, 16), (24, 40)])
def test_models_run_at_any_multiple_of_their_factor(name, size):
    model = load_model(name)
    spec = model.spec
    x = torch.randn(2, spec.latent_channels, *size)
    ctx = torch.randn(2, 5, spec.context_dim) if spec.context_dim else None
    out = model(x, torch.tensor([10.0, 900.0]), context=ctx)
    assert out.shape == x.shape
    assert out.abs().mean() > 1e-2          # untrained configs are initialised non-zero
    assert not torch.allclose(out[0], out[1])  # the timestep matters


def test_conditioning_changes_the_output():
    model = load_model("unet-small")
    x = torch.randn(1, model.spec.latent_channels, 16, 16)
    a = model(x, 500.0, class_labels=torch.tensor([1]))
    b = model(x, 500.0, class_labels=torch.tensor([2]))
    assert (a - b).abs().max() > 1e-4
    model = load_model("dit-small-text")
    c1, c2 = torch.randn(1, 3, 64), torch.randn(1, 3, 64)
    assert (model(x, 500.0, context=c1) - model(x, 500.0, context=c2)).abs().max() > 1e-4


def test_factors_are_stated():
    assert get_spec("unet-small").downsample_factor == 4
    assert get_spec("dit-small").downsample_factor == 2
    assert get_spec("unet-small").pixel_factor == 16


def test_weights_round_trip_and_errors(tmp_path):
    model = load_model("dit-small", seed=3)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    again = load_model("dit-small", weights=str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    with pytest.raises(ModelError, match="does not match model 'unet-small'"):
        check_weights(get_spec("unet-small"), str(path))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        load_model("dit-small", weights=str(bad))
    with pytest.raises(ModelError, match="valid models"):
        get_spec("nope")


@pytest.mark.parametrize("name", ["unet-small", "dit-small"])
def test_profile_flops_extrapolate_exactly(name):
    """The FLOP count fitted from two small traces equals a direct count at a third size."""
    model = load_model(name)
    spec = model.spec
    prof = ModelProfile.trace(model, spec.latent_channels, spec.downsample_factor)
    direct = 0
    hooks = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda m, a, o: flops.append(
                2 * o.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(lambda m, a, o: flops.append(2 * o.numel() * m.in_features)))
    flops = []
    h, w = 6 * spec.downsample_factor, 5 * spec.downsample_factor
    with torch.no_grad():
        model(torch.randn(1, spec.latent_channels, h, w), 1.0)
    direct = sum(flops)
    from parafuse.models.layers import Attention
    for m in model.modules():
        if isinstance(m, Attention) and not m.is_cross:
            dim = m.to_q.in_features
            # the token count of this attention's level, read off the model's own structure
            f = 4 if spec.arch == "unet" else spec.downsample_factor
            tokens = (h // f) * (w // f)
            direct += 4 * tokens * tokens * dim
    assert prof.flops(h, w) == pytest.approx(direct, rel=1e-9)


def test_every_spec_builds():
    """Every spec's module tree constructs, with parameters. On the meta device: the construction
    is what is checked, and the full-size specs' random weights took 30 s on CPU (the small specs
    are built, initialised and run by the other tests)."""
    for name, spec in MODELS.items():
        if spec.weights is None:
            model = spec.build(device="meta")
            assert sum(p.numel() for p in model.parameters()) > 0, name


@pytest.mark.parametrize("name", ["unet-small-text", "dit-small-text"])
def test_token_streams_are_contiguous_so_no_layer_norm_copies_them(name):
    """A transposed [B, C, h, w] -> [B, h*w, C] view is strided, and a residual add keeps its first
    operand's strides: a strided token stream makes every LayerNorm copy its input and every add run
    strided (on an H100 3 copies a layer of `unet-xl`). Checked on the plain model and on a strip."""
    from parafuse.parallel.distributed import ParallelLayout
    from parafuse.parallel.transport import NullTransport
    from parafuse.runtime import ParallelConfig, Request, Runtime

    strided = []

    def watch(mod, args):
        if not args[0].is_contiguous():
            strided.append(tuple(args[0].stride()))

    model = load_model(name)
    spec = model.spec
    handles = [m.register_forward_pre_hook(watch) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert handles
    model(torch.randn(1, spec.latent_channels, 16, 16), 500.0, context=torch.randn(1, 5, spec.context_dim))
    rt = Runtime(model, ParallelConfig("full", 1), device="cpu", layout=ParallelLayout(1, 3),
                 transport=NullTransport(1, 3))
    step = rt.rank_step(Request(96, 64, 4, "ddim", seed=0, context=torch.randn(1, 5, spec.context_dim)))
    step()
    assert not strided, f"LayerNorm inputs with strides {strided[:3]}"
