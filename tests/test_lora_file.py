"""Header-only inspection (hypersd_core.lora_file): every official name and layout, key formats,
this pack's metadata, and unusable files. Real safetensors files; no ComfyUI needed except to
build the layouts from its architectures."""
from __future__ import annotations

import struct

import pytest
import torch

from hypersd_dev import layouts as L

OFFICIAL = {
    # name: (family, variant, steps, cfg, sampler, schedule, eta, strength)
    "Hyper-SD15-1step-lora.safetensors": ("SD1.5", "unified", 1, 1.0, "tcd", "tcd", 1.0, 1.0),
    "Hyper-SD15-2steps-lora.safetensors": ("SD1.5", "nsteps", 2, 1.0, "ddim", "trailing", 0.0, 1.0),
    "Hyper-SD15-4steps-lora.safetensors": ("SD1.5", "nsteps", 4, 1.0, "ddim", "trailing", 0.0, 1.0),
    "Hyper-SD15-8steps-lora.safetensors": ("SD1.5", "nsteps", 8, 1.0, "ddim", "trailing", 0.0, 1.0),
    "Hyper-SD15-8steps-CFG-lora.safetensors": ("SD1.5", "cfg", 8, 5.0, "ddim", "trailing", 0.0, 1.0),
    "Hyper-SD15-12steps-CFG-lora.safetensors": ("SD1.5", "cfg", 12, 5.0, "ddim", "trailing", 0.0, 1.0),
    "Hyper-SDXL-1step-lora.safetensors": ("SDXL", "unified", 1, 1.0, "tcd", "tcd", 1.0, 1.0),
    "Hyper-SDXL-2steps-lora.safetensors": ("SDXL", "nsteps", 2, 1.0, "ddim", "trailing", 0.0, 1.0),
    "Hyper-SDXL-4steps-lora.safetensors": ("SDXL", "nsteps", 4, 1.0, "ddim", "trailing", 0.0, 1.0),
    "Hyper-SDXL-8steps-lora.safetensors": ("SDXL", "nsteps", 8, 1.0, "ddim", "trailing", 0.0, 1.0),
    "Hyper-SDXL-8steps-CFG-lora.safetensors": ("SDXL", "cfg", 8, 5.0, "ddim", "trailing", 0.0, 1.0),
    "Hyper-SDXL-12steps-CFG-lora.safetensors": ("SDXL", "cfg", 12, 5.0, "ddim", "trailing", 0.0, 1.0),
    "Hyper-SD3-4steps-CFG-lora.safetensors": ("SD3", "cfg", 4, 3.0, "euler", "simple", 0.0, 0.125),
    "Hyper-SD3-8steps-CFG-lora.safetensors": ("SD3", "cfg", 8, 5.0, "euler", "simple", 0.0, 0.125),
    "Hyper-SD3-16steps-CFG-lora.safetensors": ("SD3", "cfg", 16, 7.0, "euler", "simple", 0.0, 0.125),
    "Hyper-FLUX.1-dev-8steps-lora.safetensors": ("FLUX", "nsteps", 8, 1.0, "euler", "simple", 0.0, 0.125),
    "Hyper-FLUX.1-dev-16steps-lora.safetensors": ("FLUX", "nsteps", 16, 1.0, "euler", "simple", 0.0, 0.125),
}


@pytest.fixture(scope="module")
def lf(pack):
    from ComfyUI_HyperSD.hypersd_core import lora_file

    return lora_file


@pytest.fixture(scope="module")
def layouts(pack):
    """Small real-layout LoRA layouts per family (names from ComfyUI's own architectures)."""
    sd15 = L.kohya_layout(L.build_model("SD1.5", L.sd15_config(), device="meta"))
    sdxl = L.kohya_layout(L.build_model("SDXL", L.sdxl_config(), device="meta"))
    flux = L.peft_flux_layout(L.build_model("FLUX", L.flux_config(small=True), device="meta"))
    # SD3 (MMDiT) in diffusers PEFT names, as the Hyper-SD3 files: a few blocks suffice for naming
    sd3 = {}
    for b in range(2):
        for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                  "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj"):
            sd3[f"transformer.transformer_blocks.{b}.{m}"] = ("x", None, (64, 64))
    return {"SD1.5": (sd15, "kohya"), "SDXL": (sdxl, "kohya"), "FLUX": (flux, "peft"), "SD3": (sd3, "peft")}


def _tiny(L_layout: dict, n: int = 40) -> dict:
    """Every kind of layer of a layout, a few of each (keeps files small)."""
    keys = sorted(L_layout)
    return {k: L_layout[k] for k in keys[:: max(1, len(keys) // n)]}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_every_official_file_is_recognised(lf, layouts, pack, tmp_path, name):
    fam, variant, steps, cfg, sampler, schedule, eta, strength = OFFICIAL[name]
    layout, fmt = layouts[fam]
    path = tmp_path / name
    L.write_lora(str(path), layout if fam == "SD3" else _tiny(layout), rank=8, alpha=8.0 if fmt == "kohya" else None,
                 fmt=fmt)
    info = lf.inspect_file(str(path))
    got = (info.family, info.variant, info.steps, info.cfg, info.sampler, info.schedule, info.eta, info.strength)
    assert got == OFFICIAL[name], (name, got)
    assert info.kind == "lora" and info.key_format == fmt and info.rank == 8 and info.official
    assert info.warnings == []
    if fam == "FLUX":
        assert info.guidance == 3.5


def test_family_comes_from_keys_not_the_name(lf, layouts, pack, tmp_path):
    """A renamed file: family from the keys, variant unknown with a warning; a wrong name is a warning."""
    p = tmp_path / "my_fast_lora.safetensors"
    L.write_lora(str(p), _tiny(layouts["SDXL"][0]), rank=4, alpha=2.0)
    info = lf.inspect_file(str(p))
    assert (info.family, info.variant, info.alpha) == ("SDXL", "unknown", 2.0)
    assert any("variant" in w for w in info.warnings)
    p = tmp_path / "Hyper-SD15-4steps-lora.safetensors"
    L.write_lora(str(p), _tiny(layouts["SDXL"][0]), rank=4, alpha=4.0)
    info = lf.inspect_file(str(p))
    assert info.family == "SDXL" and any("file name says SD1.5" in w for w in info.warnings)


def test_key_formats(lf, pack, tmp_path):
    """kohya, PEFT (unet.* lora_A/B), old diffusers (.lora.down), ComfyUI (diffusion_model.*)."""
    from safetensors.torch import save_file

    r, ctx = 4, 768
    variants = {
        "kohya": {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (r, ctx),
                  "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": (320, r)},
        "peft": {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (r, ctx),
                 "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": (320, r)},
        "diffusers": {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight": (r, ctx),
                      "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.up.weight": (320, r)},
        "comfyui": {"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.lora_down.weight": (r, ctx),
                    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.lora_up.weight": (320, r)},
    }
    for fmt, shapes in variants.items():
        p = tmp_path / f"{fmt}.safetensors"
        save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(p))
        info = lf.inspect_file(str(p))
        assert (info.key_format, info.family, info.rank, info.modules) == (fmt, "SD1.5", r, 1), fmt


def test_trained_by_this_pack(lf, layouts, pack, tmp_path):
    """The trainer's hypersd.* metadata decides the variant and the recommended settings."""
    meta = {"hypersd.trained_by": "ComfyUI-HyperSD", "hypersd.family": "SD1.5", "hypersd.stages": "4,2",
            "hypersd.recommended_steps": "2", "hypersd.recommended_cfg": "1.0", "hypersd.recommended_sampler": "ddim",
            "hypersd.recommended_eta": "0.0", "hypersd.recommended_schedule": "trailing", "hypersd.complete": "true"}
    p = tmp_path / "hypersd_tscd_00001_.safetensors"
    L.write_lora(str(p), _tiny(layouts["SD1.5"][0]), rank=4, alpha=4.0, metadata=meta)
    info = lf.inspect_file(str(p))
    assert (info.variant, info.variant_source, info.family, info.stages) == ("hypersd_trained", "metadata", "SD1.5", [4, 2])
    assert (info.steps, info.cfg, info.sampler, info.schedule) == (2, 1.0, "ddim", "trailing")
    assert info.metadata["hypersd.trained_by"] == "ComfyUI-HyperSD"


def test_one_segment_lora_gets_the_measured_recipe_whether_written_or_not(lf, layouts, tmp_path):
    """The one definition of a one-segment final stage (metadata.recipe_for, decided on the toy with
    bench_tscd --quality): what the trainer writes, what the inspector reads from that, and what it
    derives for a file without recommended keys all agree: one TCD step at eta 1, cfg 1."""
    from ComfyUI_HyperSD.hypersd_core import metadata

    written = metadata.trained_metadata(method="tscd", family="SD1.5", stages=[4, 2, 1], settings={"rank": 4},
                                        step=9, total_steps=9, complete=True, rank=4)
    assert {k: v for k, v in written.items() if k.startswith(metadata.RECOMMENDED)} == {
        "hypersd.recommended_steps": "1", "hypersd.recommended_cfg": "1.0", "hypersd.recommended_sampler": "tcd",
        "hypersd.recommended_eta": "1.0", "hypersd.recommended_schedule": "tcd"}
    bare = {k: v for k, v in written.items() if not k.startswith(metadata.RECOMMENDED)}
    p = tmp_path / "one_segment.safetensors"
    for meta in (written, bare):
        L.write_lora(str(p), _tiny(layouts["SD1.5"][0]), rank=4, alpha=4.0, metadata=meta)
        info = lf.inspect_file(str(p))
        assert (info.variant, info.stages) == ("hypersd_trained", [4, 2, 1]) and not info.warnings
        assert (info.steps, info.sampler, info.schedule, info.eta, info.cfg) == (1, "tcd", "tcd", 1.0, 1.0)
        assert lf.with_steps(info, 4).eta == 0.3  # run at more steps, TCD's eta follows, as for the official file


def test_score_distilled_file_carries_its_eta_per_step_count(lf, layouts, tmp_path):
    """A TSCD + score-distillation file recommends one TCD step at eta 1 and carries the measured
    eta per step count (metadata.SCORE_ETA_BY_STEPS), which the inspector hands out when the
    file runs at more steps; an unreadable table is a warning and the usual rule applies."""
    from ComfyUI_HyperSD.hypersd_core import metadata

    written = metadata.trained_metadata(method="tscd", family="SD1.5", stages=[4, 2, 1],
                                        settings={"rank": 4, "score_steps": 100}, step=9, total_steps=9,
                                        complete=True, rank=4, recipe_segments=1)
    assert written["hypersd.recommended_eta_by_steps"] == "1:1.0,2:1.0,4:1.0,8:0.6"
    p = tmp_path / "unified.safetensors"
    L.write_lora(str(p), _tiny(layouts["SD1.5"][0]), rank=4, alpha=4.0, metadata=written)
    info = lf.inspect_file(str(p))
    assert (info.steps, info.sampler, info.schedule, info.eta) == (1, "tcd", "tcd", 1.0) and not info.warnings
    assert [lf.with_steps(info, n).eta for n in (1, 2, 3, 4, 6, 8, 12)] == [1.0, 1.0, 1.0, 1.0, 1.0, 0.6, 0.6]
    tscd_only = metadata.trained_metadata(method="tscd", family="SD1.5", stages=[4, 2, 1], settings={"rank": 4},
                                          step=9, total_steps=9, complete=True, rank=4)
    assert "hypersd.recommended_eta_by_steps" not in tscd_only  # TSCD alone keeps the unified rule
    # a score stage carrying the feedback term: its own measured table (the toy's unified LoRA)
    with_feedback = metadata.trained_metadata(method="tscd", family="SD1.5", stages=[4, 2, 1],
                                              settings={"rank": 4, "score_steps": 100, "score_feedback_weight": 0.5},
                                              step=9, total_steps=9, complete=True, rank=4, recipe_segments=1)
    assert with_feedback["hypersd.recommended_eta_by_steps"] == "1:1.0,2:0.3,4:0.6,8:0.3"
    L.write_lora(str(p), _tiny(layouts["SD1.5"][0]), rank=4, alpha=4.0, metadata=with_feedback)
    info = lf.inspect_file(str(p))
    assert [lf.with_steps(info, n).eta for n in (1, 2, 4, 8)] == [1.0, 0.3, 0.6, 0.3]
    L.write_lora(str(p), _tiny(layouts["SD1.5"][0]), rank=4, alpha=4.0,
                 metadata={**written, "hypersd.recommended_eta_by_steps": "2:1.5"})
    info = lf.inspect_file(str(p))
    assert any("eta_by_steps" in w for w in info.warnings)
    assert lf.with_steps(info, 2).eta == 0.3
    with pytest.raises(ValueError):
        metadata.parse_eta_by_steps("0:1.0")


def test_one_step_generator_file_recommends_one_step_from_800(lf, layouts, tmp_path):
    """Score distillation with the generator at t 800 (a dedicated one-step LoRA, as the official
    one-step UNet) recommends what it was trained for: one LCM step from timestep 800, cfg 1."""
    from ComfyUI_HyperSD.hypersd_core import metadata

    written = metadata.trained_metadata(method="tscd", family="SD1.5", stages=[4, 2, 1],
                                        settings={"rank": 4, "score_steps": 100, "generator_t": 800}, step=9,
                                        total_steps=9, complete=True, rank=4, recipe_segments=1)
    p = tmp_path / "onestep.safetensors"
    L.write_lora(str(p), _tiny(layouts["SD1.5"][0]), rank=4, alpha=4.0, metadata=written)
    info = lf.inspect_file(str(p))
    assert (info.steps, info.sampler, info.schedule, info.cfg) == (1, "lcm", "one_step", 1.0) and not info.warnings
    unified = metadata.trained_metadata(method="tscd", family="SD1.5", stages=[4, 2, 1],
                                        settings={"rank": 4, "score_steps": 100, "generator_t": 999}, step=9,
                                        total_steps=9, complete=True, rank=4, recipe_segments=1)
    assert (unified["hypersd.recommended_sampler"], unified["hypersd.recommended_schedule"]) == ("tcd", "tcd")


def test_whole_models_are_not_loras(lf, pack, tmp_path):
    """The diffusers one-step UNet and a ComfyUI checkpoint are told apart from LoRAs."""
    from safetensors.torch import save_file

    unet = {"conv_in.weight": torch.zeros(320, 4, 3, 3), "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight":
            torch.zeros(640, 2048), "add_embedding.linear_1.weight": torch.zeros(1280, 2816)}
    save_file(unet, str(tmp_path / "Hyper-SDXL-1step-Unet.safetensors"))
    info = lf.inspect_file(str(tmp_path / "Hyper-SDXL-1step-Unet.safetensors"))
    assert (info.kind, info.key_format, info.family, info.variant, info.steps, info.schedule, info.sampler) == (
        "unet", "diffusers", "SDXL", "onestep_unet", 1, "one_step", "lcm")
    ck = {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(640, 2048),
          "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}
    save_file(ck, str(tmp_path / "Hyper-SDXL-1step-Unet-Comfyui.fp16.safetensors"))
    info = lf.inspect_file(str(tmp_path / "Hyper-SDXL-1step-Unet-Comfyui.fp16.safetensors"))
    assert (info.kind, info.family, info.variant) == ("checkpoint", "SDXL", "onestep_unet")


def test_unusable_files(lf, pack, tmp_path):
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 768), "lora_unet_x.lora_up.weight": torch.zeros(320, 4)},
              str(good))
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    cases = {
        "empty.safetensors": (b"", "empty"),
        "tiny.safetensors": (b"\x01\x02", "truncated"),
        "cut_header.safetensors": (data[: 8 + n // 2], "truncated"),
        "cut_data.safetensors": (data[:-100], "truncated"),
        "huge_header.safetensors": (struct.pack("<Q", 1 << 40) + b"{}", "not a valid safetensors"),
        "not_json.safetensors": (struct.pack("<Q", 8) + b"\xff\xfe{{{{{{", "corrupt"),
        "bad_entry.safetensors": (struct.pack("<Q", 24) + b'{"a":{"dtype":"F32"}}   ', "corrupt"),
        "renamed_ckpt.safetensors": (b"PK\x03\x04" + b"\x00" * 64, "not a valid safetensors"),
        "empty.ckpt": (b"", "empty"),
        "garbage.pt": (b"\x80\x02" + b"\x00" * 40, "refused"),
    }
    for name, (raw, word) in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(lf.LoraFileError) as ei:
            lf.inspect_file(str(tmp_path / name))
        assert word in str(ei.value), (name, str(ei.value))


def test_pickle_is_read_weights_only_on_meta(lf, pack, tmp_path):
    sd = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.ones(4, 768),
          "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.ones(320, 4)}
    torch.save(sd, tmp_path / "Hyper-SD15-4steps-lora.pt")
    info = lf.inspect_file(str(tmp_path / "Hyper-SD15-4steps-lora.pt"))
    assert (info.container, info.family, info.variant, info.steps, info.rank) == ("pickle", "SD1.5", "nsteps", 4, 4)

    class Boom:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"x": Boom()}, tmp_path / "evil.ckpt")
    with pytest.raises(lf.LoraFileError, match="refused"):
        lf.inspect_file(str(tmp_path / "evil.ckpt"))


def _bytes_read() -> int:
    """Bytes this thread has read through read() calls so far (Linux's per-thread I/O counters)."""
    with open("/proc/thread-self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_inspection_reads_no_tensor_data(lf, pack, tmp_path):
    """A full-size (787 MB) SDXL file is inspected from its header: the bytes read are the header's
    and the 788 four-byte alphas, not one byte of the weights."""
    import os

    if not os.path.exists("/proc/thread-self/io"):
        pytest.skip("no per-thread I/O counters on this system")
    model = L.build_model("SDXL", L.sdxl_config(), device="meta")
    p = tmp_path / "Hyper-SDXL-8steps-lora.safetensors"
    size = L.write_sparse_lora(str(p), L.kohya_layout(model), 64, 64.0)
    (header_len,) = struct.unpack("<Q", p.read_bytes()[:8])
    before = _bytes_read()
    info = lf.inspect_file(str(p))
    read = _bytes_read() - before
    assert (info.family, info.modules, info.rank, info.alpha, info.steps) == ("SDXL", 788, 64, 64.0, 8)
    expected = 8 + header_len + 4 * 788
    # the counter also counts this thread's read of the counter itself (a few hundred bytes)
    assert expected <= read <= expected + 4096, (read, expected, size)
