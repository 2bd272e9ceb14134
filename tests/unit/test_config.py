"""PatchConfig: one validated config, each rule written once, the CLI generated from it, and the
names scripts already import kept as thin aliases."""
import argparse

import pytest
import torch

import parafuse
from parafuse.generate import config_from_args, parse_args
from parafuse.parallel.config import (BASELINES, DEFAULT_HALO_PORTION, FIELDS, ConfigError, Kernels, Mode, NormMode,
                                      PatchConfig, TextMerge)
from parafuse.parallel.plan import LOCAL, PatchPlan
from parafuse.parallel.geometry import StripGeometry


def test_mode_dependent_defaults_are_filled_once():
    assert PatchConfig().mode == Mode.FULL == "full"            # the one default mode, CLI and library
    assert parse_args([]).mode == "full"
    assert PatchConfig(mode="partial").halo_portion == DEFAULT_HALO_PORTION
    assert PatchConfig(mode="full").halo_portion is None        # no window to set
    want = {"sync": ("exact", "exact"), "full": ("exact", "stale"), "partial": ("exact", "stale"),
            "none": ("local", "exact"), "distrifusion": ("corrected", "stale"), "pcpp": ("corrected", "stale")}
    for mode, (norm, text) in want.items():
        cfg = PatchConfig(mode=mode)
        assert (cfg.norm_mode, cfg.text_merge) == (norm, text), mode


@pytest.mark.parametrize("mode", ["partial", "pcpp"])
def test_a_window_of_zero_rows_exchanges_nothing_in_every_rule(mode):
    """partial and pcpp at halo_portion 0 are `none`: no exchange, local statistics, no stale text,
    no codec - the same answer from the config, the plan and the checks (once three copies that
    disagreed for pcpp)."""
    cfg = PatchConfig(mode=mode, halo_portion=0.0)
    assert not cfg.exchanges and not cfg.stale and cfg.norm_mode == NormMode.LOCAL
    assert cfg.text_merge == TextMerge.EXACT
    plan = PatchPlan([], StripGeometry(16, 8, 2, 1), 0, 1, torch.float32, cfg)
    assert plan.sync_step is LOCAL and plan.stale_step is LOCAL
    with pytest.raises(ConfigError, match="does not apply with mode .* halo_portion 0"):
        PatchConfig(mode=mode, halo_portion=0.0, norm_mode="exact")
    with pytest.raises(ConfigError, match="kv_codec 'sign'"):
        PatchConfig(mode=mode, halo_portion=0.0, kv_codec="sign")


def test_baselines_compute_their_modes_values_and_move_data_their_way():
    for baseline, mode in BASELINES.items():
        cfg = PatchConfig(mode=baseline)
        assert cfg.computes == mode and cfg.pattern == "all-gather" and cfg.stale
    assert PatchConfig(mode="full").pattern == "neighbours"


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="fast"), "unknown mode 'fast'; valid: sync, full, partial, none, distrifusion, pcpp"),
    (dict(mode="full", halo_portion=0.5), r"halo_portion \(--halo-portion\) sets the window of mode partial"),
    (dict(mode="none", halo_portion=0.5), "exchanges nothing: leave it out"),
    (dict(mode="partial", halo_portion=1.5), r"must lie in \[0, 1\]"),
    (dict(warmup_steps=2.5), "warmup_steps must be a whole number, got 2.5"),
    (dict(warmup_steps=True), "warmup_steps must be a number, got bool True"),
    (dict(warmup_steps="4"), "warmup_steps must be a number, got str '4'"),
    (dict(warmup_steps=-1), "warmup_steps .* must be >= 0"),
    (dict(cfg_parallel="yes"), "cfg_parallel must be True or False, got 'yes'"),
    (dict(mode="partial", halo_portion=float("nan")), "halo_portion must be a finite number"),
    (dict(exchange_timeout=0), r"exchange_timeout \(--exchange-timeout\) must be a positive number of seconds"),
    (dict(startup_timeout=float("inf")), "startup_timeout must be a finite number"),
    (dict(mode="sync", norm_mode="stale"), "does not apply with mode sync"),
    (dict(mode="sync", text_merge="stale"), "needs a stale mode"),
    (dict(mode="pcpp", kv_codec="sign"), "moves data as the published system does"),
    (dict(kernels="cuda"), "unknown kernels 'cuda'; valid: torch, triton"),
    (dict(dtype="fp8"), "unknown dtype 'fp8'; valid: fp32, bf16, fp16"),
])
def test_every_refusal_names_the_setting_and_what_to_use(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PatchConfig(**kwargs)


def test_settings_are_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        PatchConfig("full")
    with pytest.raises(AttributeError):
        PatchConfig().mode = "sync"


def test_device_defaults_resolve_on_the_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert PatchConfig().on(cpu).kernels == Kernels.TORCH and PatchConfig().on(cpu).dtype == "fp32"
    assert PatchConfig(kernels="torch").on(cuda).dtype == "bf16" and PatchConfig(kernels="torch").on(cuda).cuda_graphs
    with pytest.raises(ConfigError, match="cuda_graphs .* needs a CUDA device"):
        PatchConfig(cuda_graphs=True).on(cpu)
    with pytest.raises(ConfigError, match="cannot capture emulated ranks"):
        PatchConfig(cuda_graphs=True, kernels="torch").on(cuda, emulated=True)


def test_the_cli_flags_come_from_the_config():
    """Every PatchConfig setting has its flag, with the config's choices and default, in its --help
    group; the parsed flags build the same config."""
    parser_actions = {}
    real = argparse.ArgumentParser.parse_args

    def capture(self, *a, **k):
        parser_actions.update({act.dest: act for act in self._actions})
        return real(self, *a, **k)
    argparse.ArgumentParser.parse_args = capture
    try:
        args = parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = real
    for name, field in FIELDS.items():
        action = parser_actions[name]
        assert field.option(name) in action.option_strings
        kind = field.kind
        if isinstance(kind, type) and issubclass(kind, __import__("enum").Enum):
            assert list(action.choices) == [m.value for m in kind], name
    assert config_from_args(args) == PatchConfig()
    args = parse_args(["--mode", "partial", "--halo-portion", "0.25", "--norm", "stale", "--kv-codec", "sign",
                       "--warmup-steps", "2", "--exchange-timeout", "30"])
    assert config_from_args(args) == PatchConfig(mode="partial", halo_portion=0.25, norm_mode="stale",
                                                 kv_codec="sign", warmup_steps=2, exchange_timeout=30.0)


def test_names_scripts_already_import_keep_working():
    """parafuse.ParallelConfig (positional order and keywords), Runtime(model, cfg, device=,
    layout=, transport=), Request and parafuse.parallelize(pipe, **kw) are thin aliases."""
    from parafuse.models import load_model
    from parafuse.parallel.distributed import ParallelLayout
    from parafuse.parallel.transport import NullTransport

    old = parafuse.ParallelConfig("partial", 2, 0.25, None, False, "sign")
    assert old == PatchConfig(mode="partial", warmup_steps=2, halo_portion=0.25, kv_codec="sign")
    assert parafuse.ParallelConfig(mode="sync", cfg_parallel=True) == PatchConfig(mode="sync", cfg_parallel=True)
    rt = parafuse.Runtime(load_model("dit-small"), old, device="cpu", layout=ParallelLayout(1, 3),
                          transport=NullTransport(1, 3))
    assert rt.parallel.mode == "partial" and rt.session.layout.patch_index == 1 and rt.engine is not None
    assert rt.check(parafuse.Request(48, 32, 2, label=1)).n == 3             # three strips, this rank the middle one
    with pytest.raises(ConfigError, match="must be a PatchConfig or its fields as keywords"):
        parafuse.parallelize(object(), "full")
    with pytest.raises(ConfigError, match="unknown mode 'fast'"):
        parafuse.parallelize(object(), mode="fast")


def test_the_stale_channel_carries_the_stale_text_merge_only_where_it_is_stale():
    """(The channel's values and bytes: tests/parallel/test_transport.py::test_the_stale_channel_changes_neither_results_nor_bytes.)"""
    assert PatchConfig(mode="partial", stale_channel=True).stale_kinds[-1] == "text_attn"
    assert "text_attn" not in PatchConfig(mode="partial", text_merge="exact").stale_kinds
    assert PatchConfig(stale_channel=True).channels()["stale_channel"] is True


def test_replace_refills_what_the_mode_filled_and_keeps_what_was_given():
    cfg = PatchConfig(mode="partial", norm_mode="stale")                 # the window filled, the norm given
    assert cfg.replace(mode="full").halo_portion is None                 # no window in full: refilled
    assert cfg.replace(halo_portion=0.5).norm_mode == NormMode.STALE      # given: kept
    assert PatchConfig(mode="full").replace(mode="sync").text_merge == TextMerge.EXACT   # filled: refilled
    with pytest.raises(ConfigError, match="does not apply with mode sync"):
        cfg.replace(mode="sync")                                         # given, and wrong for the new mode
    resolved = PatchConfig(mode="partial").on(torch.device("cpu"))
    assert resolved.replace(mode="sync").norm_mode == NormMode.EXACT     # `on` keeps what it filled
