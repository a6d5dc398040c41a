"""The LoRA loader through a real ComfyUI server: inspect route, clear errors, example workflows.

The loader examples in ``example_workflows/`` are the graphs of ``hypersd_dev.example_graphs``
laid out in the UI format (``python -m scripts.build_example_workflows`` regenerates them).
Each test run converts the shipped UI files back to API format and executes them with tiny
models and LoRAs of the same layout, named as the official files.
"""
from __future__ import annotations

import pytest
import torch

from hypersd_dev import example_graphs, workflows
from hypersd_dev.fixtures import split_checkpoint
from hypersd_dev.server import ExecutionFailed

# ----------------------------------------------------------------------------- tiny stand-ins


def _shipped_api(name: str, object_info: dict) -> dict:
    return workflows.ui_to_api(workflows.load(example_graphs.example_path(name)), object_info)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name,variant", [("hypersd_sd15_nstep_lora", "8 steps, ddim"),
                                          ("hypersd_sd15_unified_tcd", "1 steps, tcd eta 1"),
                                          ("hypersd_sd15_cfg_lora", "cfg 5")])
def test_sd15_examples_run(server, example_parts, name, variant):
    """The SD1.5 examples, as shipped, run end to end (tiny UNet, real CLIP-L layout, TAESD)."""
    info = server.get("/object_info")
    api = split_checkpoint(_shipped_api(name, info), example_parts)
    entry = server.run(api, timeout=300)
    imgs = server.output_files(entry, "8", "images")
    assert imgs and imgs[0].exists()
    summary = "".join(entry["outputs"]["9"]["text"])
    assert variant in summary and "SD1.5" in summary and "(automatic)" in summary, summary


@pytest.mark.parametrize("name,want", [("hypersd_sdxl_nstep_lora", ("SDXL 4-step LoRA", "4 steps, ddim")),
                                       ("hypersd_sdxl_unified_tcd", ("SDXL unified", "1 steps, tcd")),
                                       ("hypersd_sdxl_cfg_lora", ("SDXL 12-step CFG", "cfg 5"))])
def test_sdxl_examples_loader_part_runs(server, example_parts, name, want):
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


def test_sdxl_onestep_unet_loader_runs(server, example_parts):
    """The one-step example's loader, as shipped, loads a diffusers-layout SDXL UNet and gives [sigma(800), 0]."""
    info = server.get("/object_info")
    api = _shipped_api("hypersd_sdxl_onestep_unet", info)
    g = {"1": api["1"], "9": {"class_type": "PreviewAny", "inputs": {"source": ["1", 5]}}}
    entry = server.run(g)
    summary = "".join(entry["outputs"]["9"]["text"])
    assert "SDXL diffusers UNet" in summary and "timestep 800" in summary, summary


def test_inspect_route(server, example_parts):
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


def test_errors_are_clear_and_the_server_keeps_serving(server, example_parts):
    """Wrong family, corrupt, truncated and empty files: one clear message each; the next prompt works."""
    server.expect_pack_errors = True
    loras = server.base / "models" / "loras"
    good = (loras / "Hyper-SD15-8steps-lora.safetensors").read_bytes()
    (loras / "hypersd_cut.safetensors").write_bytes(good[: len(good) // 3])
    (loras / "hypersd_empty.safetensors").write_bytes(b"")
    (loras / "hypersd_junk.safetensors").write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00" + b"x" * 64)
    base = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": example_parts["unet"], "weight_dtype": "default"}}}

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


def test_input_model_unchanged_after_graph(server, example_parts):
    """The UNet the loader got is unpatched after the graph: the same sampling without the LoRA gives the
    same latent before and after a LoRA graph ran."""
    def plain(prefix):
        return {
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": example_parts["unet"], "weight_dtype": "default"}},
            "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": example_parts["clip"], "type": "stable_diffusion"}},
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


@pytest.mark.parametrize("name, folder, says", [
    ("Hyper-SDXL-1step-Unet.safetensors", "diffusion_models", ("Hyper-SD UNet Loader", "your SDXL base checkpoint")),
    ("Hyper-SD15-8steps-lora.safetensors", "loras", ("is a LoRA for SD1.5, not a checkpoint", "Hyper-SD LoRA Loader",
                                                     "your SD1.5 base checkpoint")),
])
def test_checkpoint_loader_given_a_unet_or_a_lora_points_to_the_right_node(server, example_parts, name, folder, says):
    """'Load Checkpoint' on the diffusers one-step UNet or an SD1.5 Hyper-SD LoRA: before it runs, the
    log names the node to use and the file's own family (an SD1.5 LoRA is not sent to an SDXL base)."""
    server.expect_pack_errors = True
    ck = server.base / "models" / "checkpoints" / name
    if not ck.exists():
        ck.symlink_to(server.base / "models" / folder / name)
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ck.name}},
         "9": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    try:
        server.run(g)
    except ExecutionFailed:
        pass
    advice = next(line for line in server.new_log().splitlines() if name in line and "Hyper-SD:" in line)
    assert all(s in advice for s in says) and ("SDXL" in name or "SDXL" not in advice), advice
    assert server.alive()
