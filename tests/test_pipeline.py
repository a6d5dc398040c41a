"""The core's training run outside any node, its settings and files, and the repository's atomic writes."""
from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys

import pytest
import torch

from ComfyUI_HyperSD.hypersd_core import files
from ComfyUI_HyperSD.hypersd_core.pipeline import RunFiles, TrainSettings
from hypersd_dev import REPO


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_give_the_permissions_of_a_plain_write(tmp_path):
    """safetensors and torch.save make 0600 files; the helper gives what open(path, 'w') gives."""
    import torch

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    st = files.save_safetensors(tmp_path / "a.safetensors", {"w": torch.zeros(2)})
    pt = files.save_torch(tmp_path / "a.pt", {"step": 1})
    assert _mode(st) == _mode(pt) == _mode(plain) == files.new_file_mode()
    kept = tmp_path / "kept.safetensors"  # replacing a file keeps its mode, as a plain write does
    kept.write_bytes(b"old")
    kept.chmod(0o640)
    files.save_safetensors(kept, {"w": torch.ones(2)})
    assert _mode(kept) == 0o640 and kept.read_bytes() != b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "a.safetensors", "kept.safetensors", "plain.txt"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    old = tmp_path / "x.txt"
    old.write_text("before")

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(files.FileSaveError, match="could not save.*No space left.*unchanged"):
        files.atomic_write(old, broken)
    assert old.read_text() == "before" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_a_write_removes_the_temporary_files_a_killed_write_left(tmp_path):
    """A process killed in a write leaves its ``.<name>.<random>.tmp``; the next write of the same
    file removes it once it is older than any write could take, and leaves a fresh one (a write
    still under way) and other files' alone."""
    import os
    import time

    target = tmp_path / "lora.safetensors"
    stale, fresh = tmp_path / ".lora.safetensors.dead0001.tmp", tmp_path / ".lora.safetensors.live0002.tmp"
    other = tmp_path / ".other.safetensors.dead0003.tmp"
    for p in (stale, fresh, other):
        p.write_bytes(b"half a file")
    old = time.time() - files.STALE_TMP_S - 60
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    files.write_text(target, "new")
    assert target.read_text() == "new"
    assert not stale.exists() and fresh.exists() and other.exists()


@pytest.mark.parametrize("bad, message", [
    (dict(stages="8,x"), "whole numbers"), (dict(steps_per_stage=0), "steps_per_stage"),
    (dict(learning_rate=float("nan")), "learning_rate"), (dict(rank=0), "rank"), (dict(batch_size=0), "batch_size"),
    (dict(teacher_cfg=0.5), "teacher_cfg"), (dict(ema_decay=1.0), "ema_decay"), (dict(loss="l1"), "huber"),
    (dict(lora_scope="unet"), "transformer"), (dict(lr_schedule="linear"), "constant, cosine"),
    (dict(checkpoint_every=-1), "checkpoint_every"), (dict(method="dmd"), "tscd"),
    (dict(score_steps=-1), "score_steps"), (dict(score_steps=5, generator_t=1000), "999 for a unified"),
    (dict(score_steps=5, fake_updates=0), "DMD2"), (dict(score_steps=5, regression_weight=-0.1), "0 or more"),
    (dict(score_steps=5, score_tscd_weight=float("inf")), "score_tscd_weight"),
])
def test_settings_are_checked_before_anything_runs(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainSettings(**bad)


def test_settings_signature_is_the_one_earlier_states_were_saved_with():
    s = TrainSettings(stages="4, 2", steps_per_stage=3, learning_rate=1e-3, rank=4, teacher_cfg=3.0, batch_size=2)
    assert s.stages == (4, 2)
    assert s.signature() == {"method": "tscd", "stages": "4,2", "steps_per_stage": 3, "learning_rate": 1e-3,
                             "rank": 4, "teacher_cfg": 3.0, "seed": 0, "batch_size": 2, "loss": "huber",
                             "lora_scope": "transformer", "ema_decay": 0.95}
    assert TrainSettings(lr_schedule="cosine").signature(prompts=3)["lr_schedule"] == "cosine"
    assert TrainSettings().signature(prompts=3)["prompts"] == 3
    scored = TrainSettings(score_steps=100).signature()
    assert {k: scored[k] for k in ("score_steps", "generator_t", "fake_updates", "regression_weight")} == {
        "score_steps": 100, "generator_t": 999, "fake_updates": 5, "regression_weight": 0.25}
    assert scored["score_tscd_weight"] == 1.0
    # at 0 the key is absent, so a score-distillation state saved before the setting existed resumes
    assert "score_tscd_weight" not in TrainSettings(score_steps=100, score_tscd_weight=0).signature()


def test_run_files_are_named_in_one_place(tmp_path):
    f = RunFiles.create(tmp_path, "my_model.safetensors")
    assert (f.lora.name, f.state.name, f.stage_lora(0, 8).name) == (
        "my_model.safetensors", "my_model.hypersd-state", "my_model_stage1_k8.safetensors")
    for bad in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(ValueError, match="plain file name"):
            RunFiles.create(tmp_path, bad)


def test_the_core_trains_the_toy_teacher_outside_comfyui(pack, tmp_path):
    """scripts/train_outside_comfyui.py: ComfyUI only loads the checkpoint; the core's run trains the bare
    UNet module; the LoRA it writes is complete, says what it is, and maps onto every layer of the toy UNet."""
    import comfy.lora
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ComfyUI_HyperSD.hypersd_core import lora_file
    from toy import arch, train_teacher

    out = subprocess.run([sys.executable, "-m", "scripts.train_outside_comfyui", "--out", str(tmp_path),
                          "--stages", "2,1", "--steps-per-stage", "2"], capture_output=True, text=True, cwd=str(REPO),
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 4 and len(summary["losses"]) == 4 and summary["family"] == "SD1.5"
    assert summary["stage_loras"] == [str(tmp_path / "hypersd_toy_outside_comfyui_stage1_k2.safetensors")]
    path = tmp_path / "hypersd_toy_outside_comfyui.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert (meta["hypersd.step"], meta["hypersd.complete"], meta["hypersd.stages"]) == ("4", "true", "2,1")
    assert _mode(path) == files.new_file_mode()
    sd = load_file(str(path))
    toy_unet = arch.build_sd15_model(train_teacher.unet_config(), seed=0)
    key_map = comfy.lora.model_lora_keys_unet(toy_unet, {})
    layers = {k[: -len(".lora_down.weight")] for k in sd if k.endswith(".lora_down.weight")}
    assert layers and layers <= set(key_map), sorted(layers - set(key_map))[:5]
    assert len(comfy.lora.load_lora(sd, key_map, log_missing=False)) == len(layers)
    info = lora_file.inspect_file(str(path))
    assert (info.variant, info.family, info.rank) == ("hypersd_trained", "SD1.5", 4) and not info.warnings


def test_tscd_then_score_distillation_gives_one_unified_lora(pack, tmp_path):
    """scripts/train_outside_comfyui.py --score-steps: the TSCD stages, then a score-distillation stage on
    the same student (fake score as a third adapter on the toy UNet): one LoRA file whose metadata records
    the score settings and recommends the unified recipe (TCD, 1 step, eta 1), beside the TSCD stage files;
    it has the same layers as a TSCD-only LoRA (the fake adapter is never saved into it)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ComfyUI_HyperSD.hypersd_core import lora_file

    out = subprocess.run([sys.executable, "-m", "scripts.train_outside_comfyui", "--out", str(tmp_path),
                          "--stages", "2", "--steps-per-stage", "1", "--score-steps", "2", "--fake-updates", "2",
                          "--batch", "2"], capture_output=True, text=True, cwd=str(REPO),
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and len(summary["losses"]) == 3
    assert all(math.isfinite(x) for x in summary["losses"])
    assert summary["stage_loras"] == [str(tmp_path / "hypersd_toy_outside_comfyui_stage1_k2.safetensors")]
    path = tmp_path / "hypersd_toy_outside_comfyui.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert (meta["hypersd.stages"], meta["hypersd.step"], meta["hypersd.complete"]) == ("2", "3", "true")
    assert (meta["hypersd.score_steps"], meta["hypersd.generator_t"], meta["hypersd.fake_updates"]) == ("2", "999", "2")
    assert (meta["hypersd.recommended_sampler"], meta["hypersd.recommended_steps"],
            meta["hypersd.recommended_eta"]) == ("tcd", "1", "1.0")
    with safe_open(str(tmp_path / "hypersd_toy_outside_comfyui_stage1_k2.safetensors"), "pt") as f:
        assert f.metadata()["hypersd.recommended_schedule"] == "trailing"  # the TSCD stage keeps its own recipe
    unified, stage = load_file(str(path)), load_file(str(tmp_path / "hypersd_toy_outside_comfyui_stage1_k2.safetensors"))
    assert set(unified) == set(stage)
    assert any(not torch.equal(unified[k], stage[k]) for k in unified)  # the score stage changed the student
    info = lora_file.inspect_file(str(path))
    assert (info.variant, info.family) == ("hypersd_trained", "SD1.5") and not info.warnings
