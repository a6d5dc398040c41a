"""HyperSDTrainTSCD through a real ComfyUI server: train, save into loras, load with core and pack loaders."""
from __future__ import annotations

import pytest
from safetensors import safe_open

from ComfyUI_HyperSD.hypersd_core import lora_file
from hypersd_dev.fixtures import tscd_train_graph as _train_graph
from hypersd_dev.server import Client, ExecutionFailed


def test_train_through_the_server_then_load_with_core_and_pack_loaders(server, sd15_parts):
    name = "srv_tscd"
    entry = server.run(_train_graph(sd15_parts, name), timeout=600)
    assert entry["status"]["status_str"] == "success"
    path = server.base / "models" / "loras" / f"{name}.safetensors"
    assert path.exists() and (path.parent / f"{name}.hypersd-state").exists()
    assert (path.parent / f"{name}_stage1_k2.safetensors").exists()  # the 2-step LoRA of stage 1
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["hypersd.trained_by"] == "ComfyUI-HyperSD" and meta["hypersd.step"] == "4"
    assert meta["hypersd.family"] == "SD1.5" and meta["hypersd.recommended_steps"] == "1"
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_") for k in keys)
    # the run, as the page's chart asks for it after a reload: every step, both stages, the files
    st, run = server.get_status("/hypersd/train/runs/6")
    assert st == 200 and (run["status"], run["step"], run["total"], run["label"]) == ("done", 4, 4, "HyperSD TSCD")
    assert [p[0] for p in run["points"]] == [1, 2, 3, 4] and all(p[1] > 0 and p[2] > 0 for p in run["points"])
    assert run["stages"] == [[0, "tscd-k2"], [2, "tscd-k1"]]
    assert run["files"] == [str(path), str(path.parent / f"{name}_stage1_k2.safetensors")]
    assert "6" in server.get("/hypersd/train/runs")["runs"]
    assert server.get_status("/hypersd/train/runs/999")[0] == 404

    start = len(server.log())
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": sd15_parts["unet"], "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": sd15_parts["clip"], "type": "stable_diffusion"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a handwritten digit 7", "clip": ["2", 0]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": path.name,
                                                              "strength_model": 1.0}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["8", 0], "seed": 1, "steps": 1, "cfg": 1.0, "sampler_name": "ddim", "scheduler": "sgm_uniform",
            "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "tscd_core_loader"}},
        "10": {"class_type": "HyperSDLoraLoader", "inputs": {"model": ["1", 0], "lora_name": path.name,
                                                             "strength": -1.0}},
        "11": {"class_type": "SamplerCustom", "inputs": {
            "model": ["10", 0], "add_noise": True, "noise_seed": 1, "cfg": ["10", 2], "positive": ["3", 0],
            "negative": ["3", 0], "sampler": ["10", 4], "sigmas": ["10", 5], "latent_image": ["4", 0]}},
        "12": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "tscd_pack_loader"}},
        "13": {"class_type": "PreviewAny", "inputs": {"source": ["10", 6]}},
    }
    entry = server.run(g)
    assert "lora key not loaded" not in server.log()[start:]
    for node in ("9", "12"):
        (latent,) = server.output_files(entry, node)
        assert latent.exists()
    # The pack's loader recognises the file as its own and applies all of it with the file's recipe.
    summary = "".join(entry["outputs"]["13"]["text"])
    n_layers = sum(1 for k in keys if k.endswith(".lora_down.weight"))
    assert "SD1.5 LoRA trained with ComfyUI-HyperSD" in summary, summary
    assert "1 steps, tcd eta 1" in summary and f"{n_layers}/{n_layers} layers applied" in summary, summary
    li = lora_file.inspect_file(str(path))
    assert li.variant == "hypersd_trained" and li.family == "SD1.5" and li.kind == "lora"
    assert li.steps == 1 and li.sampler == "tcd" and not li.warnings


def test_bad_output_name_fails_with_a_clear_message(server, sd15_parts):
    server.expect_pack_errors = True
    with pytest.raises(ExecutionFailed) as e:
        server.run(_train_graph(sd15_parts, "../escape"))
    assert "plain file name" in str(e.value)
    assert not (server.base / "models" / "escape.safetensors").exists()


def test_demo_runs_each_trained_lora_with_the_recipe_its_metadata_gives(server, sd15_parts, pack):
    """The main job's demo asks the pack's /hypersd/inspect how to sample each toy LoRA."""
    from toy import demo

    name = "hypersd_toy_srvdemo"
    server.run(_train_graph(sd15_parts, name, steps_per_stage=1, teacher_cfg=1.5), timeout=600)
    client = Client(server.url)
    stage = client.inspect(f"{name}_stage1_k2.safetensors")
    assert (stage["variant"], stage["steps"], stage["sampler"], stage["schedule"]) == ("hypersd_trained", 2, "tcd",
                                                                                        "trailing")
    assert client.inspect("no_such_file.safetensors") is None
    rows = {r["name"]: r for r in demo.variants(server.get("/object_info"), client.inspect)}
    k2 = rows[f"{name}_stage1_k2 tcd eta 0.3 trailing 2 steps cfg 1"]
    assert (k2["sampler"], k2["scheduler"], k2["steps"], k2["cfg"]) == ("tcd", "hypersd_trailing", 2, 1.0)
    unified = {}  # the final (k = 1) LoRA at each step count, through the Hyper-SD LoRA Loader with its eta
    for steps in demo.UNIFIED_STEPS:
        (r,) = [r for r in rows.values() if r.get("lora") == f"{name}.safetensors" and r["steps"] == steps]
        assert (r["sampler"], r["scheduler"], r["loader"]) == ("tcd", "hypersd_tcd", "HyperSDLoraLoader"), r
        assert f"tcd eta {1 if steps == 1 else 0.3:g} {steps} steps" in r["name"], r  # TSCD only: the unified rule
        unified[steps] = r["name"]
    teacher = rows[f"teacher euler {demo.TEACHER_STEPS} steps cfg 1.5 (the LoRAs' teacher)"]
    assert teacher["cfg"] == 1.5 and "lora" not in teacher
    # every step count a LoRA runs at comes after its control: the bare teacher at the same
    # steps with its best few-step sampler, at the guidance the LoRAs were distilled from
    order = [r["name"] for r in demo.variants(server.get("/object_info"), client.inspect)]
    for steps in demo.UNIFIED_STEPS:
        control = [r for r in rows.values() if "(control)" in r["name"] and r["steps"] == steps]
        assert len(control) == 1 and control[0]["cfg"] == 1.5 and "lora" not in control[0], control
        assert order.index(control[0]["name"]) < order.index(unified[steps])
