"""The embedded toy model family: a real SD1.5-format checkpoint that ComfyUI loads and that
draws the prompted digit, its quality measure, and an idempotent installation."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from hypersd_dev import REPO, comfy_dir
from hypersd_dev.fixtures import place
from hypersd_dev.server import Client

COMFY = comfy_dir()

# Measured on the committed weights through the server: 25-step euler at the demo's cfg (2),
# 10 images per digit (seeds 1000-1009): accuracy 0.88, FID 104.5 against the 500 held-out
# real digits on the judge's features (bench_tscd --quality gives the 500-image numbers: the
# 50-step teacher scores 60.4 there; FID reads higher on smaller samples). The bounds leave room
# for other CPUs' float differences.
TEACHER_MIN_ACCURACY = 0.78
TEACHER_FID_BOUND = 136.0


@pytest.fixture(scope="module")
def toy(pack):
    from toy import data, demo, install, quality

    return {"data": data, "demo": demo, "install": install, "quality": quality}


@pytest.fixture(scope="module")
def toy_models(toy):
    """The toy models installed once in a cache folder (reused while the weights are unchanged)."""
    models = Path(tempfile.gettempdir()) / "hypersd-test-files" / "toy-models"
    return toy["install"].install(models)


@pytest.fixture(scope="module")
def toy_ckpt(comfy_server, toy_models):
    return place(comfy_server.base, "checkpoints", toy_models["checkpoint"])


def test_checkpoint_is_detected_as_sd15_with_taesd_vae(comfy, toy_models):
    import comfy.sd
    import comfy.supported_models
    import comfy.taesd.taesd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(toy_models["checkpoint"]))
    assert type(model.model.model_config) is comfy.supported_models.SD15
    unet = model.model.model_config.unet_config
    assert unet["model_channels"] == 320 and unet["context_dim"] == 768
    assert isinstance(vae.first_stage_model, comfy.taesd.taesd.TAESD)
    assert vae.downscale_ratio == 8
    cond = clip.encode_from_tokens(clip.tokenize("a handwritten digit 7"))
    assert tuple(cond.shape) == (1, 77, 768)
    size = sum(p.stat().st_size for p in (REPO / "toy" / "weights").iterdir())
    assert size < 64 * 2 ** 20, f"committed toy weights take {size / 2 ** 20:.1f} MB"


def test_generated_clip_is_the_one_the_teacher_was_trained_with(toy):
    from toy import clip

    install = toy["install"]
    assert install.fingerprint(clip.generate_clip_l(install.CLIP_SEED)) == install.CLIP_SHA256


def _draw(server, ckpt, toy, v, per_digit=10, seed=1000):
    from PIL import Image

    g, saves = toy["demo"].digits_graph(ckpt, v, per_digit, seed, "toy_test/" + v["sampler"])
    entry = server.run(g)
    imgs, labels = [], []
    for d in range(10):
        files = server.output_files(entry, saves[d], "images")
        assert len(files) == per_digit
        imgs += [np.asarray(Image.open(f).convert("RGB")) for f in files]
        labels += [d] * per_digit
    return toy["quality"].measure(np.stack(imgs), labels)


def test_teacher_draws_the_prompted_digit_through_the_server(server, toy, toy_ckpt):
    """CheckpointLoaderSimple -> CLIPTextEncode -> KSampler (25 steps, cfg) -> VAEDecode on the server."""
    v = {"sampler": "euler", "scheduler": "normal", "steps": 25, "cfg": toy["demo"].TEACHER_CFG}
    m = _draw(server, toy_ckpt, toy, v)
    print("teacher 25 steps:", m)
    assert m["accuracy"] >= TEACHER_MIN_ACCURACY, m
    assert m["fid"] < TEACHER_FID_BOUND, m


# The committed toy LoRAs (toy/train_student.py), each at the step count and with the recipe
# its metadata recommends (the demo's first row for it: k steps TCD eta 0.3 on the trailing grid
# for a k-step LoRA; the unified and TSCD-final ones: TCD at 8 steps, their eta), cfg 1, 10 images per digit (seeds
# 1000-1009), through the server. Measured on the committed files (accuracy, FID); a run must
# keep the accuracy within 0.1 and the FID within 1.3x, room for other CPUs' float differences.
LORA_MEASURED = {
    "hypersd_toy_tscd_lora.safetensors": (0.92, 85.1),  # unified (300 score steps, feedback 0.5), TCD 8 steps, eta 0.3
    "hypersd_toy_tscd_lora_stage4_k1.safetensors": (0.84, 85.3),  # TSCD final, TCD 8 steps, eta 0.3
    "hypersd_toy_tscd_lora_stage1_k8.safetensors": (0.96, 86.1),  # its own 2000-step run (README)
    "hypersd_toy_tscd_lora_stage2_k4.safetensors": (0.72, 141.4),
    "hypersd_toy_tscd_lora_stage3_k2.safetensors": (0.67, 201.9),
    # the k4 LoRA with its feedback LoRA merged at 0.75 (toy/train_feedback.py), DDIM trailing 4 steps
    "hypersd_toy_feedback_lora_k4.safetensors": (0.95, 122.0),
    # the k2 LoRA with its feedback LoRA merged at 1 (180 steps, its own eta), TCD trailing 2 steps, eta 0.3
    "hypersd_toy_feedback_lora_k2.safetensors": (0.98, 146.1),
    # the unified LoRA with its feedback LoRA merged at 0.5 (anchor 2, its own eta per step count), TCD 8 steps (the
    # demo's first row), eta 0.3
    "hypersd_toy_feedback_lora_unified.safetensors": (0.96, 85.2),
}
# The k-step LoRAs that beat the bare teacher at their own step count with their own recipe
# (bench_tscd --quality, 500 images x 3 seed sets: all three, in every seed set), with the measured
# FID ratio LoRA / control at 10 images per digit here: k2 201.9 against 537.9 (0.38). At this
# size the k4 (141.4 against 170.0, 0.83) and k8 (86.1 against 97.4, 0.88) ratios are too close to
# the margin to hold on other machines' floats, so CI checks k2 and the bench carries the claim.
CONTROL_MEASURED = {"hypersd_toy_tscd_lora_stage3_k2.safetensors": 0.38}
CONTROL_MARGIN = 0.85  # the ratio a run must stay under


def test_committed_feedback_loras_were_made_by_their_preset():
    """Each committed feedback LoRA's metadata is the settings of its toy.train_feedback preset (the
    command the README gives re-makes a file of the same kind): the LoRA it was trained on, step
    counts, eta (one, or the LoRA's own per step count), where the reward scored, anchor, and the merged
    file's ratio."""
    from safetensors import safe_open

    from toy.train_feedback import PRESETS

    for preset in PRESETS.values():
        for stem in (preset["name"], preset["name"] + "_feedback"):
            with safe_open(str(REPO / "toy" / "weights" / f"{stem}.safetensors"), "pt") as f:
                meta = f.metadata()
            assert meta["hypersd.feedback_on"].split("@")[0] == preset["lora"], stem
            assert meta["hypersd.feedback_steps"] == preset["steps_of_lora"], stem
            assert float(meta["hypersd.feedback_eta"]) == preset["eta"], stem
            # files made before these two settings existed have neither: the defaults
            assert meta.get("hypersd.feedback_scored_steps", "late half") == preset["scored_steps"], stem
            assert float(meta.get("hypersd.feedback_anchor_weight", 0.0)) == preset["anchor_weight"], stem
            # eta_of_lora: each step count at the LoRA's own eta, written as a table
            assert ("hypersd.feedback_eta_by_steps" in meta) == preset["eta_of_lora"], stem
            if stem == preset["name"]:  # the merged file
                assert float(meta["hypersd.feedback_ratio"]) == preset["merge_ratio"], stem
            else:
                assert "hypersd.feedback_ratio" not in meta and meta["hypersd.feedback_only"].startswith("true"), stem


def test_every_committed_toy_lora_has_a_measurement():
    """Every committed LoRA the demo draws (a feedback LoRA alone is drawn merged with its few-step LoRA)."""
    committed = {p.name for p in (REPO / "toy" / "weights").glob("hypersd_toy*lora*.safetensors")}
    assert {n for n in committed if not n.endswith("_feedback.safetensors")} == set(LORA_MEASURED)


@pytest.mark.parametrize("lora", sorted(LORA_MEASURED))
def test_committed_toy_lora_draws_the_digits_with_its_own_recipe(server, toy, toy_ckpt, lora):
    name = place(server.base, "loras", REPO / "toy" / "weights" / lora)
    demo = toy["demo"]
    rows = [r for r in demo.variants(server.get("/object_info"), Client(server.url).inspect)
            if r.get("lora") == name]
    assert rows, f"the demo has no row for {name}"
    m = _draw(server, toy_ckpt, toy, rows[0])
    print(f"{rows[0]['name']}: {m}")
    accuracy, fid = LORA_MEASURED[lora]
    assert m["accuracy"] >= accuracy - 0.1, m
    assert m["fid"] < 1.3 * fid, m


@pytest.mark.parametrize("lora", sorted(CONTROL_MEASURED))
def test_k_step_lora_beats_the_bare_teacher_at_its_step_count(server, toy, toy_ckpt, lora):
    """The control the demo draws before every LoRA: the teacher without LoRA at the LoRA's own
    step count with its best few-step sampler (at the guidance the LoRA was distilled from) gives
    worse digits than the distilled LoRA; the gap distillation exists to close."""
    name = place(server.base, "loras", REPO / "toy" / "weights" / lora)
    rows = toy["demo"].variants(server.get("/object_info"), Client(server.url).inspect)
    i = next(i for i, r in enumerate(rows) if r.get("lora") == name)
    control = next(r for r in reversed(rows[:i]) if "lora" not in r)
    assert "(control)" in control["name"] and control["steps"] == rows[i]["steps"], control
    m_lora = _draw(server, toy_ckpt, toy, rows[i])
    m_bare = _draw(server, toy_ckpt, toy, control)
    print(f"{rows[i]['name']}: {m_lora}; {control['name']}: {m_bare}")
    assert m_lora["fid"] < CONTROL_MARGIN * m_bare["fid"], (m_lora, m_bare)


@pytest.mark.parametrize("merged,base", [("hypersd_toy_feedback_lora_k4.safetensors",
                                          "hypersd_toy_tscd_lora_stage2_k4.safetensors")])
def test_feedback_lora_draws_better_digits_than_the_lora_it_was_trained_on(server, toy, toy_ckpt, merged, base):
    """Human feedback learning with the toy's reward model (not the judge): the judge finds the
    prompted digit more often and the FID lower than with the few-step LoRA alone, at its own
    recipe (measured at 100 images: accuracy 0.95 against 0.77, FID 122.0 against 166.6)."""
    got = {}
    for name in (merged, base):
        place(server.base, "loras", REPO / "toy" / "weights" / name)
    rows = toy["demo"].variants(server.get("/object_info"), Client(server.url).inspect)
    for name in (merged, base):
        row = next(r for r in rows if r.get("lora") == name)
        got[name] = _draw(server, toy_ckpt, toy, row)
    print(got)
    assert got[merged]["accuracy"] >= got[base]["accuracy"] + 0.1, got
    assert got[merged]["fid"] < got[base]["fid"], got


def test_quality_measure_ranks_real_and_damaged_digits(toy):
    import torch
    import torch.nn.functional as F

    data, quality = toy["data"], toy["quality"]
    sp = data.split()
    held = quality.measure(sp["test_x"], sp["test_y"])
    assert held["accuracy"] >= 0.95, held  # 0.966 measured on the committed judge (toy/weights/training.json)
    x, y = sp["train_x"][::7][:200], sp["train_y"][::7][:200]
    real = quality.measure(x, y)
    blurred = quality.measure(F.avg_pool2d(x.unsqueeze(1), 5, 1, 2).squeeze(1), y)
    noisy = quality.measure((x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1), y)
    one_class = quality.measure(x[y == 1], y[y == 1])
    assert real["accuracy"] >= 0.95, real  # 0.975 measured
    assert real["fid"] < blurred["fid"] and real["fid"] < noisy["fid"] and real["fid"] < one_class["fid"], (
        real, blurred, noisy, one_class)
    # ComfyUI IMAGE layout ([N, H, W, 3] in [0, 1]) and uint8 arrays give the same answer
    img = x.unsqueeze(-1).expand(-1, -1, -1, 3)
    assert quality.measure(img, y)["fid"] == pytest.approx(real["fid"], rel=1e-6)
    assert quality.measure((img.numpy() * 255).round().astype(np.uint8), y)["accuracy"] == pytest.approx(
        real["accuracy"], abs=0.01)


def test_install_twice_does_not_regenerate(toy, tmp_path):
    install = toy["install"]
    first = install.install(tmp_path)
    assert {install.CHECKPOINT_NAME, install.VAE_NAME} <= {Path(p).name for p in first["written"]}
    assert {p.name for p in first["loras"]} == {p.name for p in (REPO / "toy" / "weights").glob("hypersd_toy*lora*")}
    stats = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (first["checkpoint"], first["vae"])}
    second = install.install(tmp_path)
    assert second["written"] == []
    assert {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in stats} == stats
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    # a damaged file is rebuilt
    first["vae"].write_bytes(b"broken")
    assert [Path(p).name for p in install.install(tmp_path)["written"]] == [install.VAE_NAME]


def test_host_setup_twice_keeps_the_installed_toy():
    """scripts/setup_host.py installs the toy into the host's models folder; a second run writes nothing."""
    if os.environ.get("COMFYUI_DIR"):
        pytest.skip("a user's own ComfyUI: set-up does not install the toy there")
    runs = []
    for _ in range(2):
        out = subprocess.run([shutil.which("python3") or sys.executable, str(REPO / "scripts" / "setup_host.py")],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        comfy_dir = Path([l for l in out.stdout.splitlines() if l.startswith("HYPERSD_COMFYUI=")][0].split("=", 1)[1])
        ckpt = comfy_dir / "models" / "checkpoints" / "hypersd_toy_digits.safetensors"
        assert ckpt.is_file(), out.stderr[-3000:]
        runs.append((ckpt.stat().st_mtime_ns, ckpt.stat().st_ino, out.stderr))
    assert runs[0][:2] == runs[1][:2], "the second set-up rewrote the toy checkpoint"
    assert "already installed" in runs[1][2], runs[1][2][-2000:]


def test_run_serves_a_users_models_folder(tmp_path):
    """run.sh --models-dir: the generated extra_model_paths.yaml makes ComfyUI list the user's files."""
    models = tmp_path / "my models: SD"
    (models / "checkpoints").mkdir(parents=True)
    (models / "Lora").mkdir()
    (models / "checkpoints" / "v1-5-pruned-emaonly.safetensors").write_bytes(b"x")
    (models / "Lora" / "Hyper-SD15-1step-lora.safetensors").write_bytes(b"x")
    yaml = tmp_path / "extra.yaml"
    out = subprocess.run([sys.executable, "-m", "scripts.user_models", str(models), str(yaml)],
                         capture_output=True, text=True, cwd=str(REPO))
    assert out.returncode == 0, out.stderr
    code = (f"import sys; sys.path.insert(0, {str(COMFY)!r}); import folder_paths; "
            f"from utils.extra_config import load_extra_path_config; load_extra_path_config({str(yaml)!r}); "
            "print(folder_paths.get_filename_list('checkpoints'), folder_paths.get_filename_list('loras'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(COMFY))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "v1-5-pruned-emaonly.safetensors" in out.stdout and "Hyper-SD15-1step-lora.safetensors" in out.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    out = subprocess.run([sys.executable, "-m", "scripts.user_models", str(empty), str(yaml)],
                         capture_output=True, text=True, cwd=str(REPO))
    assert out.returncode == 1 and "no model" in out.stderr


def test_pages_follow_their_layout(toy):
    """The toy's pages (data.SIZE) and the VAE's training pages (data.VAE_LAYOUT) come from the same
    digits and seeds: each layout has its own size, and every digit lies inside its page."""
    import torch

    data = toy["data"]
    ink, _ = data._raw_digits()
    pages = data.place(ink[:40], seed=5)
    vae_pages = data.place(ink[:40], seed=5, layout=data.VAE_LAYOUT)
    assert pages.shape == (40, data.SIZE, data.SIZE) and data.SIZE == 8 * data.LATENT
    assert vae_pages.shape == (40, data.VAE_LAYOUT[0], data.VAE_LAYOUT[0])
    assert torch.equal(pages, data.place(ink[:40], seed=5))  # seeded: the same pages again
    for p in (pages, vae_pages):
        assert float(p.min()) < 0.2 and float(p.max()) == 1.0  # ink on a white page
        # the inked box fits the layout's largest size
        rows = (p < 0.5).any(2)
        spans = [int(r.nonzero().max() - r.nonzero().min() + 1) for r in rows if r.any()]
        assert max(spans) <= (data.MAX_BOX if p is pages else data.VAE_LAYOUT[2])
