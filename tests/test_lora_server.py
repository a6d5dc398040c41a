"""The LoRA loader through a real ComfyUI server: inspect route, clear errors, example workflows.

The example workflows in ``example_workflows/hypersd_*`` are the API graphs below laid out
in the UI format (``python tests/test_lora_server.py --write`` against a running server
regenerates them). Each test run converts the shipped UI files back to API format and
executes them with tiny models and LoRAs of the same layout, named as the official files.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, ExecutionFailed, cached_file, place

sys.path.insert(0, str(Path(__file__).parent))
import workflows  # noqa: E402

EXAMPLES = REPO / "example_workflows"

# ----------------------------------------------------------------------------- the workflows (API format)


def _sd_graph(base_ckpt: str, lora: str, size: int, positive: str, negative: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": base_ckpt}},
        "2": {"class_type": "HyperSDLoraLoader", "inputs": {"model": ["1", 0], "lora_name": lora, "strength": -1.0,
                                                              "steps": 0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "SamplerCustom", "inputs": {
            "model": ["2", 0], "add_noise": True, "noise_seed": 42, "cfg": ["2", 2], "positive": ["3", 0],
            "negative": ["4", 0], "sampler": ["2", 4], "sigmas": ["2", 5], "latent_image": ["5", 0]}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "HyperSD"}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["2", 6]}},
    }


PROMPT = "a photo of a red fox in the snow, detailed fur, soft light"
NEG = "blurry, low quality, deformed"

WORKFLOWS = {
    "hypersd_sd15_nstep_lora": dict(
        graph=_sd_graph("v1-5-pruned-emaonly.safetensors", "Hyper-SD15-8steps-lora.safetensors", 512, PROMPT, ""),
        note="Hyper-SD15 N-step LoRA. Expects models/checkpoints/v1-5-pruned-emaonly.safetensors and "
             "models/loras/Hyper-SD15-8steps-lora.safetensors (or the 2/4-step files: the loader reads the "
             "step count from the file). DDIM with the trailing schedule, cfg 1: the negative prompt has no effect."),
    "hypersd_sd15_unified_tcd": dict(
        graph=_sd_graph("v1-5-pruned-emaonly.safetensors", "Hyper-SD15-1step-lora.safetensors", 512, PROMPT, ""),
        note="Hyper-SD15 unified LoRA with TCD. Expects models/loras/Hyper-SD15-1step-lora.safetensors. "
             "One step with eta 1.0; set the loader's steps to 2-8 for more detail (eta drops to 0.3)."),
    "hypersd_sd15_cfg_lora": dict(
        graph=_sd_graph("v1-5-pruned-emaonly.safetensors", "Hyper-SD15-8steps-CFG-lora.safetensors", 512, PROMPT, NEG),
        note="Hyper-SD15 CFG LoRA: classifier-free guidance works (cfg 5 from the loader) and the negative prompt "
             "counts. Expects models/loras/Hyper-SD15-8steps-CFG-lora.safetensors (or the 12-step file)."),
    "hypersd_sdxl_nstep_lora": dict(
        graph=_sd_graph("sd_xl_base_1.0.safetensors", "Hyper-SDXL-4steps-lora.safetensors", 1024, PROMPT, ""),
        note="Hyper-SDXL N-step LoRA. Expects models/checkpoints/sd_xl_base_1.0.safetensors and "
             "models/loras/Hyper-SDXL-4steps-lora.safetensors (2/4/8-step files all work)."),
    "hypersd_sdxl_unified_tcd": dict(
        graph=_sd_graph("sd_xl_base_1.0.safetensors", "Hyper-SDXL-1step-lora.safetensors", 1024, PROMPT, ""),
        note="Hyper-SDXL unified LoRA with TCD. Expects models/loras/Hyper-SDXL-1step-lora.safetensors."),
    "hypersd_sdxl_cfg_lora": dict(
        graph=_sd_graph("sd_xl_base_1.0.safetensors", "Hyper-SDXL-12steps-CFG-lora.safetensors", 1024, PROMPT, NEG),
        note="Hyper-SDXL CFG LoRA with a negative prompt (cfg 5). Expects "
             "models/loras/Hyper-SDXL-12steps-CFG-lora.safetensors (or the 8-step file)."),
    "hypersd_sdxl_onestep_unet": dict(
        graph={
            "1": {"class_type": "HyperSDUNetLoader", "inputs": {"unet_name": "Hyper-SDXL-1step-Unet.safetensors",
                                                                  "timestep": 800}},
            "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["2", 1]}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
            "6": {"class_type": "SamplerCustom", "inputs": {
                "model": ["1", 0], "add_noise": True, "noise_seed": 42, "cfg": ["1", 2], "positive": ["3", 0],
                "negative": ["3", 0], "sampler": ["1", 3], "sigmas": ["1", 4], "latent_image": ["5", 0]}},
            "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["2", 2]}},
            "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "HyperSD"}},
        },
        note="Hyper-SDXL one-step UNet (diffusers format). Put Hyper-SDXL-1step-Unet.safetensors in "
             "models/diffusion_models (NOT checkpoints: 'Load Checkpoint' cannot read it). CLIP and VAE come from "
             "sd_xl_base_1.0.safetensors. One LCM step from timestep 800. For the ComfyUI single-file version "
             "(Hyper-SDXL-1step-Unet-Comfyui.fp16.safetensors) use 'Load Checkpoint' + 'Hyper-SD One-Step Scheduler'."),
    "hypersd_flux_lora": dict(
        graph={
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
            "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                             "clip_name2": "t5xxl_fp16.safetensors", "type": "flux",
                                                             "device": "default"}},
            "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
            "4": {"class_type": "HyperSDLoraLoader", "inputs": {"model": ["1", 0],
                                                                  "lora_name": "Hyper-FLUX.1-dev-8steps-lora.safetensors",
                                                                  "strength": -1.0, "steps": 0}},
            "5": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["2", 0]}},
            "6": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["5", 0], "guidance": 3.5}},
            "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
            "8": {"class_type": "SamplerCustom", "inputs": {
                "model": ["4", 0], "add_noise": True, "noise_seed": 42, "cfg": ["4", 2], "positive": ["6", 0],
                "negative": ["6", 0], "sampler": ["4", 4], "sigmas": ["4", 5], "latent_image": ["7", 0]}},
            "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
            "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "HyperSD"}},
            "11": {"class_type": "PreviewAny", "inputs": {"source": ["4", 6]}},
        },
        note="Hyper-FLUX.1-dev 8-step LoRA. Expects models/diffusion_models/flux1-dev.safetensors, "
             "models/text_encoders/clip_l.safetensors + t5xxl_fp16.safetensors, models/vae/ae.safetensors and "
             "models/loras/Hyper-FLUX.1-dev-8steps-lora.safetensors (16-step file works too). Strength is automatic "
             "(0.125); guidance 3.5 via FluxGuidance, cfg 1."),
}


def write_examples(object_info: dict) -> None:
    EXAMPLES.mkdir(exist_ok=True)
    for name, wf in WORKFLOWS.items():
        ui = workflows.api_to_ui(wf["graph"], object_info, notes=[wf["note"]])
        path = EXAMPLES / f"{name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(ui, indent=1) + "\n")
        os.replace(tmp, path)


# ----------------------------------------------------------------------------- tiny stand-ins


@pytest.fixture(scope="module")
def parts(comfy_server, sd15_parts, pack):
    """Tiny SD1.5 UNet + CLIP-L (shared), a tiny TAESD VAE, tiny LoRAs named as the official files."""
    from ComfyUI_HyperSD.toy import arch, layouts

    def build_vae(path):
        import comfy.taesd.taesd

        torch.manual_seed(0)
        vae = comfy.taesd.taesd.TAESD(latent_channels=4)
        with torch.no_grad():
            for n, p in vae.named_parameters():
                p.copy_(torch.randn(p.shape) * (0.05 if p.dim() > 1 else 0.01))
        layouts.save_file_atomic({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))

    vae = cached_file("hypersd_test_taesd.safetensors", build_vae, ("tests/test_lora_server.py",))
    sd15 = layouts.build_model("SD1.5", arch.sd15_unet_config(320), device="meta")
    sd15_layout = layouts.kohya_layout(sd15)
    sdxl_small = layouts.build_model("SDXL", layouts.sdxl_config(small=True), seed=2)
    sdxl_layout = layouts.kohya_layout(sdxl_small)
    out = {"unet": sd15_parts["unet"], "clip": sd15_parts["clip"],
           "vae": place(comfy_server, "vae", vae, "hypersd_test_taesd.safetensors")}
    loras = comfy_server.base / "models" / "loras"
    for official in ("Hyper-SD15-8steps-lora.safetensors", "Hyper-SD15-1step-lora.safetensors",
                     "Hyper-SD15-8steps-CFG-lora.safetensors"):
        if not (loras / official).exists():
            layouts.write_lora(str(loras / official), sd15_layout, rank=4, alpha=4.0, scale=0.002)
    for official in ("Hyper-SDXL-4steps-lora.safetensors", "Hyper-SDXL-1step-lora.safetensors",
                     "Hyper-SDXL-12steps-CFG-lora.safetensors"):
        if not (loras / official).exists():
            layouts.write_lora(str(loras / official), sdxl_layout, rank=4, alpha=4.0, scale=0.002)
    unet_dir = comfy_server.base / "models" / "diffusion_models"
    if not (unet_dir / "Hyper-SDXL-1step-Unet.safetensors").exists():
        layouts.save_file_atomic(layouts.diffusers_unet_state_dict(sdxl_small),
                                 str(unet_dir / "Hyper-SDXL-1step-Unet.safetensors"))
    return out


def _split_checkpoint(api: dict, parts: dict) -> dict:
    """CheckpointLoaderSimple -> UNETLoader + CLIPLoader + VAELoader with the tiny stand-ins."""
    api = json.loads(json.dumps(api))
    for nid, node in list(api.items()):
        if node["class_type"] != "CheckpointLoaderSimple":
            continue
        api[nid] = {"class_type": "UNETLoader", "inputs": {"unet_name": parts["unet"], "weight_dtype": "default"}}
        api[nid + "_clip"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": parts["clip"],
                                                                      "type": "stable_diffusion"}}
        api[nid + "_vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": parts["vae"]}}
        for other in api.values():
            for k, v in other["inputs"].items():
                if isinstance(v, list) and len(v) == 2 and v[0] == nid and v[1] in (1, 2):
                    other["inputs"][k] = [nid + ("_clip" if v[1] == 1 else "_vae"), 0]
    for node in api.values():
        if node["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage"):
            node["inputs"].update(width=64, height=64)
    return api


def _shipped_api(name: str, object_info: dict) -> dict:
    return workflows.ui_to_api(workflows.load(EXAMPLES / f"{name}.json"), object_info)


# ----------------------------------------------------------------------------- tests


def test_example_files_match_the_graphs(server):
    """Every example ships, names its official files, and converts back to the graph above."""
    info = server.get("/object_info")
    for name, wf in WORKFLOWS.items():
        path = EXAMPLES / f"{name}.json"
        assert path.exists(), f"{path.name} missing: run python tests/test_lora_server.py --write"
        api = {nid: {k: v for k, v in node.items() if k != "_meta"} for nid, node in _shipped_api(name, info).items()}
        assert api == wf["graph"], name
        text = path.read_text()
        for node in wf["graph"].values():
            for v in node["inputs"].values():
                if isinstance(v, str) and v.endswith(".safetensors"):
                    assert v in text


@pytest.mark.parametrize("name,variant", [("hypersd_sd15_nstep_lora", "8 steps, ddim"),
                                          ("hypersd_sd15_unified_tcd", "1 steps, tcd eta 1"),
                                          ("hypersd_sd15_cfg_lora", "cfg 5")])
def test_sd15_examples_run(server, parts, name, variant):
    """The SD1.5 examples, as shipped, run end to end (tiny UNet, real CLIP-L layout, TAESD)."""
    info = server.get("/object_info")
    api = _split_checkpoint(_shipped_api(name, info), parts)
    entry = server.run(api, timeout=300)
    imgs = server.output_files(entry, "8", "images")
    assert imgs and imgs[0].exists()
    summary = "".join(entry["outputs"]["9"]["text"])
    assert variant in summary and "SD1.5" in summary and "(automatic)" in summary, summary


@pytest.mark.parametrize("name,want", [("hypersd_sdxl_nstep_lora", ("SDXL 4-step LoRA", "4 steps, ddim")),
                                       ("hypersd_sdxl_unified_tcd", ("SDXL unified", "1 steps, tcd")),
                                       ("hypersd_sdxl_cfg_lora", ("SDXL 12-step CFG", "cfg 5"))])
def test_sdxl_examples_loader_part_runs(server, parts, name, want):
    """SDXL examples: the Hyper-SD part as shipped (LoRA loader -> settings) on a tiny SDXL-layout model.

    CLIP-G (694 M parameters) is not generated in CI, so the text-encoding, sampling and decoding
    nodes are left out; the model is a tiny SDXL-layout UNet loaded by HyperSDUNetLoader.
    """
    info = server.get("/object_info")
    api = _shipped_api(name, info)
    keep = {"2": api["2"], "9": api["9"]}
    keep["1"] = {"class_type": "HyperSDUNetLoader", "inputs": {"unet_name": "Hyper-SDXL-1step-Unet.safetensors",
                                                                 "timestep": 800}}
    entry = server.run(keep)
    summary = "".join(entry["outputs"]["9"]["text"])
    assert all(w in summary for w in want) and "strength 1 (automatic)" in summary, summary


def test_sdxl_onestep_unet_loader_runs(server, parts):
    """The one-step example's loader, as shipped, loads a diffusers-layout SDXL UNet and gives [sigma(800), 0]."""
    info = server.get("/object_info")
    api = _shipped_api("hypersd_sdxl_onestep_unet", info)
    g = {"1": api["1"], "9": {"class_type": "PreviewAny", "inputs": {"source": ["1", 5]}}}
    entry = server.run(g)
    summary = "".join(entry["outputs"]["9"]["text"])
    assert "SDXL diffusers UNet" in summary and "timestep 800" in summary, summary


def test_inspect_route(server, parts):
    st, body = server.get_status("/hypersd/inspect?lora=Hyper-SD15-8steps-lora.safetensors")
    assert st == 200, body
    assert (body["family"], body["key_format"], body["variant"], body["steps"], body["rank"], body["alpha"]) == (
        "SD1.5", "kohya", "nsteps", 8, 4, 4.0)
    assert body["use_node"] == "HyperSDLoraLoader" and body["summary"]
    st, body = server.get_status("/hypersd/inspect?unet=Hyper-SDXL-1step-Unet.safetensors")
    assert st == 200 and body["kind"] == "unet" and body["variant"] == "onestep_unet" and body["family"] == "SDXL"
    assert body["use_node"] == "HyperSDUNetLoader"
    for bad in ("../../etc/passwd", "/etc/passwd", "..%2F..%2Fcomfy.db", "C:%5Cx.safetensors"):
        st, body = server.get_status(f"/hypersd/inspect?lora={bad}")
        assert st == 400 and "error" in body, (bad, st, body)
    st, body = server.get_status("/hypersd/inspect?lora=nope.safetensors")
    assert st == 404 and "error" in body
    st, body = server.get_status("/hypersd/inspect")
    assert st == 400


def test_errors_are_clear_and_the_server_keeps_serving(server, parts):
    """Wrong family, corrupt, truncated and empty files: one clear message each; the next prompt works."""
    server.expect_pack_errors = True
    loras = server.base / "models" / "loras"
    good = (loras / "Hyper-SD15-8steps-lora.safetensors").read_bytes()
    (loras / "hypersd_cut.safetensors").write_bytes(good[: len(good) // 3])
    (loras / "hypersd_empty.safetensors").write_bytes(b"")
    (loras / "hypersd_junk.safetensors").write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00" + b"x" * 64)
    base = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": parts["unet"], "weight_dtype": "default"}}}

    def run_lora(name):
        g = dict(base)
        g["2"] = {"class_type": "HyperSDLoraLoader", "inputs": {"model": ["1", 0], "lora_name": name, "strength": -1.0}}
        g["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["2", 6]}}
        return server.run(g)

    cases = {"Hyper-SDXL-4steps-lora.safetensors": ("SDXL LoRA", "model is SD1.5", " of "),
             "hypersd_cut.safetensors": ("truncated",), "hypersd_empty.safetensors": ("empty",),
             "hypersd_junk.safetensors": ("corrupt",)}
    for name, words in cases.items():
        with pytest.raises(ExecutionFailed) as ei:
            run_lora(name)
        msg = ei.value.error.get("exception_message", "")
        assert all(w in msg for w in words), (name, msg)
        assert server.alive()
    assert "lora key not loaded" not in server.new_log()
    st, _ = server.get_status("/hypersd/inspect?lora=hypersd_cut.safetensors")
    assert st == 422
    entry = run_lora("Hyper-SD15-8steps-lora.safetensors")
    assert "8 steps" in "".join(entry["outputs"]["9"]["text"])


def test_input_model_unchanged_after_graph(server, parts):
    """The UNet the loader got is unpatched after the graph: the same sampling without the LoRA gives the
    same latent before and after a LoRA graph ran."""
    def plain(prefix):
        return {
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": parts["unet"], "weight_dtype": "default"}},
            "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": parts["clip"], "type": "stable_diffusion"}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["2", 0]}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "5": {"class_type": "KSampler", "inputs": {
                "model": ["1", 0], "seed": 3, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
                "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
            "9": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}},
        }
    from safetensors.torch import load_file

    a = server.output_files(server.run(plain("lora_before")), "9")[0]
    lora_graph = plain("lora_with")
    lora_graph["6"] = {"class_type": "HyperSDLoraLoader", "inputs": {
        "model": ["1", 0], "lora_name": "Hyper-SD15-8steps-lora.safetensors", "strength": 4.0}}
    lora_graph["5"]["inputs"]["model"] = ["6", 0]
    w = server.output_files(server.run(lora_graph), "9")[0]
    b = server.output_files(server.run(plain("lora_after")), "9")[0]
    la, lw, lb = (load_file(str(p))["latent_tensor"] for p in (a, w, b))
    assert torch.equal(la, lb), "the base model stayed patched after the LoRA graph"
    assert not torch.equal(la, lw), "the LoRA had no effect"


def test_checkpoint_loader_given_a_unet_points_to_the_right_node(server, parts):
    """'Load Checkpoint' on the diffusers one-step UNet: the log names HyperSDUNetLoader before it runs."""
    server.expect_pack_errors = True
    ck = server.base / "models" / "checkpoints" / "Hyper-SDXL-1step-Unet.safetensors"
    if not ck.exists():
        ck.symlink_to(server.base / "models" / "diffusion_models" / "Hyper-SDXL-1step-Unet.safetensors")
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ck.name}},
         "9": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    try:
        server.run(g)
    except ExecutionFailed:
        pass
    assert "HyperSDUNetLoader" in server.new_log() or "Hyper-SD UNet Loader" in server.new_log()
    assert server.alive()


if __name__ == "__main__":  # regenerate example_workflows/hypersd_*.json from a running server
    import urllib.request

    url = sys.argv[sys.argv.index("--url") + 1] if "--url" in sys.argv else "http://127.0.0.1:8188"
    if "--write" in sys.argv:
        with urllib.request.urlopen(url + "/object_info") as r:
            write_examples(json.loads(r.read()))
        print("wrote", len(WORKFLOWS), "workflows to", EXAMPLES)
