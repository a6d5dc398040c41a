"""HyperSDTrainTSCD with one prompt per latent (a captioned dataset), in-process on a tiny UNet."""
from __future__ import annotations

import pytest
import torch


def _model():
    from toy import arch

    with torch.inference_mode():
        return arch.tiny_sd15_patcher(model_channels=32, seed=0)


def _dataset(n_per_prompt=4):
    """Two prompts (contexts filled with 1 and 2), one LATENT and one CONDITIONING per image."""
    gen = torch.Generator().manual_seed(0)
    latents, positives = [], []
    for value in (1.0, 2.0):
        ctx = torch.full((1, 77, 768), value)
        for _ in range(n_per_prompt):
            latents.append({"samples": torch.randn(1, 4, 8, 8, generator=gen)})
            positives.append([[ctx.clone(), {}]])  # equal by value, not the same object (as CLIPTextEncode gives)
    return latents, positives


def _context_recorder(calls: list):
    """A real ComfyUI UNet wrapper that records the context of every conditional row.

    A plain function (model options are deep-copied with the model; a function is kept as is).
    """

    def wrapper(apply_model, args):
        c = args["c"]
        ctx = c["c_crossattn"]
        rows_per_chunk = args["input"].shape[0] // len(args["cond_or_uncond"])
        values = []
        for j, kind in enumerate(args["cond_or_uncond"]):
            if kind == 0:  # positive
                values.append(ctx[j * rows_per_chunk:(j + 1) * rows_per_chunk, 0, 0].tolist())
        calls.append(values)
        return apply_model(args["input"], args["timestep"], **c)

    return wrapper


def _train(training, latents, positives, name, model=None, **kw):
    args = dict(stages="2", steps_per_stage=6, learning_rate=1e-3, rank=4, teacher_cfg=3.0, seed=0,
                output_name=name, checkpoint_every=0, batch_size=3, resume=False)
    args.update(kw)
    neg = [[torch.zeros(1, 77, 768), {}]]
    with torch.inference_mode():
        return training.train_tscd(model or _model(), latents, positives, neg, positive_per_latent=True, **args)


def test_each_batch_is_trained_with_its_own_prompt(training, loras):
    latents, positives = _dataset()
    model = _model()
    calls: list = []
    model.set_model_unet_function_wrapper(_context_recorder(calls))
    _, path, trainer = _train(training, latents, positives, "per_prompt", model=model)
    assert trainer.step == 6 and path.endswith("per_prompt.safetensors")
    assert calls, "the UNet wrapper was never called"
    seen = set()
    for call in calls:
        for rows in call:
            assert len(set(rows)) == 1, f"one batch mixed prompts: {rows}"
            seen.add(rows[0])
    assert seen == {1.0, 2.0}, f"both prompts should be trained, saw {seen}"


def test_input_order_does_not_change_the_lora(training, loras):
    from safetensors.torch import load_file

    latents, positives = _dataset()
    _, p1, _ = _train(training, latents, positives, "order_a")
    order = [5, 0, 7, 2, 1, 6, 3, 4]
    _, p2, _ = _train(training, [latents[i] for i in order], [positives[i] for i in order], "order_b")
    a, b = load_file(p1), load_file(p2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prompt_count_must_match_latent_count(training, loras):
    latents, positives = _dataset()
    with pytest.raises(ValueError, match="one per latent"):
        _train(training, latents, positives[:3], "mismatch")


def test_captioned_folder_through_the_server(server, example_parts):
    """Core's dataset nodes (one caption per image) feed the node; it trains on every prompt."""
    from PIL import Image
    from safetensors import safe_open

    folder = server.base / "input" / "hypersd_tscd_captions"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        Image.new("RGB", (64, 64), (40 * i, 255 - 40 * i, 128)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a handwritten digit {i % 2}")
    name = "srv_tscd_captions"
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": example_parts["unet"], "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": example_parts["clip"], "type": "stable_diffusion"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": example_parts["vae"]}},
        "4": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": folder.name}},
        "5": {"class_type": "MakeTrainingDataset", "inputs": {"images": ["4", 0], "texts": ["4", 1], "vae": ["3", 0],
                                                              "clip": ["2", 0]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
        "7": {"class_type": "HyperSDTrainTSCD", "inputs": {
            "model": ["1", 0], "latents": ["5", 0], "positive": ["5", 1], "negative": ["6", 0], "stages": "1",
            "steps_per_stage": 2, "learning_rate": 1e-4, "rank": 4, "teacher_cfg": 5.0, "seed": 0,
            "output_name": name, "checkpoint_every": 0, "batch_size": 2, "resume": False}},
    }
    entry = server.run(g, timeout=600)
    assert entry["status"]["status_str"] == "success"
    with safe_open(str(server.base / "models" / "loras" / f"{name}.safetensors"), "pt") as f:
        assert f.metadata()["hypersd.step"] == "2"
    state = torch.load(server.base / "models" / "loras" / f"{name}.hypersd-state", weights_only=True)
    assert state["signature"]["prompts"] == 2
