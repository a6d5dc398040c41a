"""HyperSDLoraLoader in-process: full-size key coverage, exact patched weights, clear errors.

Real ComfyUI models (meta device for the released sizes, small real ones of the same
layout for the weight check), real LoRA files, ComfyUI's own key maps. Nothing mocked.
"""
from __future__ import annotations

import logging
import os

import pytest
import torch

RANK, ALPHA = 64, 64.0


@pytest.fixture(scope="module")
def L(pack):
    from hypersd_dev import layouts

    return layouts


@pytest.fixture(scope="module")
def lora_mod(pack):
    from ComfyUI_HyperSD.nodes import lora

    return lora


@pytest.fixture(scope="module")
def loras_dir(comfy, tmp_path_factory):
    """A private loras folder registered with ComfyUI's folder_paths for this module, removed after it."""
    from hypersd_dev.fixtures import registered_folder

    with registered_folder("loras", tmp_path_factory.mktemp("loras")) as d:
        yield d


def _patcher(model):
    from toy import arch

    return arch.wrap_patcher(model)


def _full(L, family):
    cfg = {"SD1.5": L.sd15_config, "SDXL": L.sdxl_config, "FLUX": L.flux_config}[family]()
    return L.build_model(family, cfg, device="meta")


@pytest.mark.parametrize("family,fmt,official", [
    ("SD1.5", "kohya", "Hyper-SD15-8steps-lora.safetensors"),
    ("SDXL", "kohya", "Hyper-SDXL-4steps-lora.safetensors"),
    ("FLUX", "peft", "Hyper-FLUX.1-dev-8steps-lora.safetensors"),
])
def test_full_size_layout_every_key_applied(L, lora_mod, tmp_path, family, fmt, official):
    """The released layout over the whole real architecture: every LoRA layer maps and patches."""
    from ComfyUI_HyperSD.hypersd_core import lora_file

    model = _full(L, family)
    layout = L.kohya_layout(model) if fmt == "kohya" else L.peft_flux_layout(model)
    path = tmp_path / official
    size = L.write_sparse_lora(str(path), layout, RANK, ALPHA if fmt == "kohya" else None, fmt)
    if family == "SD1.5":
        assert abs(size / 1e6 - 269) < 1.0 and len(layout) == 278
    if family == "SDXL":
        assert abs(size / 1e6 - 787) < 1.0 and len(layout) == 788
    info = lora_file.inspect_file(str(path), official)
    assert (info.family, info.key_format, info.rank, info.modules) == (family, fmt, RANK, len(layout))
    assert info.alpha == (ALPHA if fmt == "kohya" else None)

    sd = L.lora_state_dict(layout, RANK, ALPHA if fmt == "kohya" else None, fmt, device="meta")
    patcher = _patcher(model)
    m, matched, total = lora_mod.apply_lora_sd(patcher, sd, info, 1.0)
    assert matched == total == len(layout)
    targets = {(k if off is None else (k, off)) for k, off, _ in layout.values()}
    patched = {(k if p[3] is None else (k, p[3])) for k, plist in m.patches.items() for p in plist}
    assert patched == targets, f"{len(targets - patched)} layers not patched"
    assert not patcher.patches, "the loader's input model was patched"


def _expected(W, down, up, scale):
    delta = (up.flatten(1) @ down.flatten(1)).reshape(W.shape)
    return W + scale * delta


@pytest.mark.parametrize("family,fmt", [("SD1.5", "kohya"), ("SDXL", "kohya"), ("FLUX", "peft")])
def test_patched_weight_equals_formula(L, lora_mod, loras_dir, family, fmt):
    """W' == W + s * (alpha/rank) * up @ down on sampled layers of a real model of the layout."""
    import comfy.model_management

    cfg = {"SD1.5": L.sd15_config, "SDXL": L.sdxl_config, "FLUX": L.flux_config}[family](small=True)
    base = _patcher(L.build_model(family, cfg, seed=1))
    layout = L.kohya_layout(base.model) if fmt == "kohya" else L.peft_flux_layout(base.model)
    rank, alpha, strength = 4, 2.0 if fmt == "kohya" else None, 0.8
    name = {"SD1.5": "Hyper-SD15-4steps-lora.safetensors", "SDXL": "Hyper-SDXL-8steps-lora.safetensors",
            "FLUX": "Hyper-FLUX.1-dev-8steps-lora.safetensors"}[family]
    L.write_lora(str(loras_dir / name), layout, rank, alpha, fmt, seed=3)
    lora_sd = L.lora_state_dict(layout, rank, alpha, fmt, seed=3)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}

    out = lora_mod.HyperSDLoraLoader.execute(base, name, strength).result
    m = out[0]
    assert m is not base and len({str(k) for k in m.patches}) == len({k for k, _, _ in layout.values()})
    scale = strength * ((alpha / rank) if alpha is not None else 1.0)
    mods = sorted(layout)
    sample = mods[:: max(1, len(mods) // 12)] + mods[-1:]
    m.patch_model()
    try:
        sd = m.model.state_dict()
        for mod in sample:
            key, off, _shape = layout[mod]
            if fmt == "kohya":
                down, up = lora_sd[f"{mod}.lora_down.weight"], lora_sd[f"{mod}.lora_up.weight"]
            else:
                down, up = lora_sd[f"{mod}.lora_A.weight"], lora_sd[f"{mod}.lora_B.weight"]
            W = before[key]
            got = sd[key]
            if off is not None:  # a slice of a fused weight (FLUX qkv / linear1)
                dim, start, length = off
                W, got = W.narrow(dim, start, length), got.narrow(dim, start, length)
            torch.testing.assert_close(got, _expected(W, down, up, scale), rtol=1e-5, atol=1e-6,
                                       msg=f"{family} {mod}")
    finally:
        m.unpatch_model()
        comfy.model_management.unload_all_models()
    for k, v in base.model.state_dict().items():
        assert torch.equal(v, before[k]), f"base weight {k} changed"
    assert not base.patches


def test_outputs_per_variant(L, lora_mod, loras_dir):
    """steps/cfg/eta/SAMPLER/SIGMAS follow the file: unified -> TCD, N-step -> DDIM trailing, CFG -> cfg 5."""
    from ComfyUI_HyperSD.hypersd_core import schedules

    base = _patcher(L.build_model("SD1.5", L.sd15_config(small=True)))
    layout = L.kohya_layout(base.model)
    ms = base.get_model_object("model_sampling")
    cases = {
        "Hyper-SD15-1step-lora.safetensors": (1, 1.0, 1.0, schedules.hypersd_sigmas(ms, 1, "tcd")),
        "Hyper-SD15-2steps-lora.safetensors": (2, 1.0, 0.0, schedules.hypersd_sigmas(ms, 2, "trailing")),
        "Hyper-SD15-8steps-CFG-lora.safetensors": (8, 5.0, 0.0, schedules.hypersd_sigmas(ms, 8, "trailing")),
    }
    for name, (steps, cfg, eta, sigmas) in cases.items():
        L.write_lora(str(loras_dir / name), layout, 4, 4.0)
        m, st, c, e, sampler, sig, summary = lora_mod.HyperSDLoraLoader.execute(base, name, -1.0).result
        assert (st, c, e) == (steps, cfg, eta), name
        torch.testing.assert_close(sig, sigmas)
        assert "strength 1 (automatic)" in summary and f"{len(layout)}/{len(layout)} layers" in summary
        assert sampler.sampler_function is not None
    # the unified LoRA at 4 steps: TCD grid, eta 0.3
    _m, st, _c, e, _s, sig, _ = lora_mod.HyperSDLoraLoader.execute(
        base, "Hyper-SD15-1step-lora.safetensors", -1.0, steps=4).result
    assert (st, e) == (4, 0.3)
    torch.testing.assert_close(sig, schedules.hypersd_sigmas(ms, 4, "tcd"))
    ts = [round(float(ms.timestep(s))) for s in sig[:-1]]
    assert ts == [999, 759, 499, 259]


def test_wrong_family_is_one_clear_error(L, lora_mod, loras_dir, caplog):
    """An SDXL LoRA on SD1.5 (and SD1.5 on SDXL, FLUX on SDXL): one message, both families, counts."""
    sd15 = _patcher(L.build_model("SD1.5", L.sd15_config(small=True)))
    sdxl = _patcher(L.build_model("SDXL", L.sdxl_config(small=True)))
    flux_layout = L.peft_flux_layout(L.build_model("FLUX", L.flux_config(small=True), device="meta"))
    L.write_lora(str(loras_dir / "xl.safetensors"), L.kohya_layout(sdxl.model), 4, 4.0)
    L.write_lora(str(loras_dir / "sd15.safetensors"), L.kohya_layout(sd15.model), 4, 4.0)
    L.write_lora(str(loras_dir / "flux.safetensors"), flux_layout, 4, None, "peft")
    cases = [(sd15, "xl.safetensors", "SDXL", "SD1.5"), (sdxl, "sd15.safetensors", "SD1.5", "SDXL"),
             (sdxl, "flux.safetensors", "FLUX", "SDXL")]
    for model, name, lora_fam, model_fam in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            with pytest.raises(lora_mod.HyperSDError) as ei:
                lora_mod.HyperSDLoraLoader.execute(model, name, -1.0)
        msg = str(ei.value)
        assert f"{lora_fam} LoRA" in msg and f"model is {model_fam}" in msg and " of " in msg, msg
        assert "lora key not loaded" not in caplog.text
        assert not model.patches


def test_partial_match_warns_once_with_counts(L, lora_mod, loras_dir, caplog):
    base = _patcher(L.build_model("SD1.5", L.sd15_config(small=True)))
    layout = dict(L.kohya_layout(base.model))
    layout["lora_unet_down_blocks_7_attentions_0_proj_in"] = ((next(iter(layout.values())))[0], None, (32, 32, 1, 1))
    layout["lora_unet_not_a_layer"] = ((next(iter(layout.values())))[0], None, (32, 32))
    L.write_lora(str(loras_dir / "Hyper-SD15-4steps-lora-partial.safetensors"), layout, 4, 4.0)
    with caplog.at_level(logging.WARNING):
        out = lora_mod.HyperSDLoraLoader.execute(base, "Hyper-SD15-4steps-lora-partial.safetensors", 1.0).result
    warn = [r for r in caplog.records if "fits this" in r.getMessage()]
    assert len(warn) == 1 and f"{len(layout) - 2} of {len(layout)}" in warn[0].getMessage()
    assert "lora key not loaded" not in caplog.text
    assert f"{len(layout) - 2}/{len(layout)} layers" in out[6]


def test_not_a_lora_and_bad_files(L, lora_mod, loras_dir, tmp_path):
    from ComfyUI_HyperSD.hypersd_core import files

    base = _patcher(L.build_model("SD1.5", L.sd15_config(small=True)))
    (loras_dir / "empty.safetensors").write_bytes(b"")
    good = loras_dir / "good.safetensors"
    L.write_lora(str(good), L.kohya_layout(base.model), 4, 4.0)
    data = good.read_bytes()
    (loras_dir / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (loras_dir / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    (loras_dir / "pickled.ckpt").write_bytes(b"\x80\x04\x95" + os.urandom(64))
    unet = L.diffusers_unet_state_dict(L.build_model("SD1.5", L.sd15_config(small=True)))
    files.save_safetensors(loras_dir / "Hyper-SDXL-1step-Unet.safetensors", unet)
    expect = {"empty.safetensors": "empty", "cut.safetensors": "truncated", "junk.safetensors": "corrupt",
              "pickled.ckpt": "refused", "Hyper-SDXL-1step-Unet.safetensors": "HyperSDUNetLoader",
              "missing.safetensors": "not in the loras folder"}
    for name, word in expect.items():
        with pytest.raises(lora_mod.HyperSDError) as ei:
            lora_mod.HyperSDLoraLoader.execute(base, name, -1.0)
        assert word in str(ei.value), (name, str(ei.value))
    assert not base.patches


def test_pickle_loaded_weights_only(L, lora_mod, loras_dir):
    """A plain-tensor .pt LoRA loads (weights-only unpickler); one with code objects is refused."""
    base = _patcher(L.build_model("SD1.5", L.sd15_config(small=True)))
    sd = L.lora_state_dict(L.kohya_layout(base.model), 4, 4.0)
    torch.save(sd, loras_dir / "Hyper-SD15-2steps-lora.pt")
    out = lora_mod.HyperSDLoraLoader.execute(base, "Hyper-SD15-2steps-lora.pt", -1.0).result
    assert out[1] == 2 and out[0].patches

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, loras_dir / "evil.pt")
    with pytest.raises(lora_mod.HyperSDError, match="refused"):
        lora_mod.HyperSDLoraLoader.execute(base, "evil.pt", -1.0)


def test_diffusers_unet_config_matches_core_at_full_size(L, lora_mod):
    """Our any-size diffusers UNet reader gives core's SDXL config on the released layout."""
    import comfy.model_detection

    model = _full(L, "SDXL")
    sd = L.diffusers_unet_state_dict(model)
    from ComfyUI_HyperSD.nodes import _unet_file

    ours = _unet_file.diffusers_unet_config(sd)
    core = comfy.model_detection.unet_config_from_diffusers_unet(sd)
    for k in ("model_channels", "num_res_blocks", "transformer_depth", "channel_mult", "transformer_depth_middle",
              "use_linear_in_transformer", "context_dim", "adm_in_channels", "transformer_depth_output", "in_channels"):
        assert ours[k] == core[k], k


def test_unet_loader_loads_small_diffusers_unet(L, lora_mod, comfy, tmp_path):
    """A diffusers-layout SDXL UNet (the one-step UNet's format) loads and equals the source."""
    from ComfyUI_HyperSD.hypersd_core import files
    from hypersd_dev.fixtures import registered_folder

    src = L.build_model("SDXL", L.sdxl_config(small=True), seed=5)
    with registered_folder("diffusion_models", tmp_path) as d:
        files.save_safetensors(d / "Hyper-SDXL-1step-Unet.safetensors", L.diffusers_unet_state_dict(src))
        m, steps, cfg, sampler, sigmas, summary = lora_mod.HyperSDUNetLoader.execute(
            "Hyper-SDXL-1step-Unet.safetensors", 800).result
    assert lora_mod.model_family(m) == "SDXL" and (steps, cfg) == (1, 1.0)
    ms = m.get_model_object("model_sampling")
    assert round(float(ms.timestep(sigmas[0]))) == 800 and float(sigmas[-1]) == 0.0 and len(sigmas) == 2
    want = src.diffusion_model.state_dict()
    got = m.model.diffusion_model.state_dict()
    for k in list(want)[::37]:  # in the dtype ComfyUI keeps it in (on a GPU, half precision)
        torch.testing.assert_close(got[k].float(), want[k].to(got[k].dtype).float())
