"""HyperSDTrainTSCD inside a real ComfyUI (in-process, CPU, tiny SD1.5-shaped UNet)."""
from __future__ import annotations

import logging
import math
import os
import resource
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from ComfyUI_HyperSD.hypersd_core import files, train

STAGES, STEPS = "2,1", 3


def _model(seed=0):
    from toy import arch

    with torch.inference_mode():  # as ComfyUI's loaders build models
        return arch.tiny_sd15_patcher(model_channels=32, seed=seed)


def _data(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lat = {"samples": torch.randn(n, 4, 8, 8, generator=gen)}
    ctx = torch.randn(1, 77, 768, generator=gen)
    return [lat], [[ctx, {}]], [[torch.zeros_like(ctx), {}]]


def _train(training, model=None, name="t", callbacks=(), **kw):
    lat, pos, neg = _data()
    args = dict(stages=STAGES, steps_per_stage=STEPS, learning_rate=1e-3, rank=4, teacher_cfg=3.0, seed=0,
                output_name=name, checkpoint_every=0, batch_size=3)
    args.update(kw)
    model = model or _model()
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return training.train_tscd(model, lat, pos, neg, callbacks=tuple(callbacks), **args)


def _read(path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


def _assert_loads_cleanly(model, sd, caplog):
    """Core LoraLoaderModelOnly's mapping: every key used, no 'lora key not loaded'."""
    import comfy.lora
    import comfy.lora_convert
    import comfy.sd

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(sd)), key_map, log_missing=False)
    n_layers = sum(1 for k in sd if k.endswith(".lora_down.weight"))
    assert len(loaded) == n_layers > 0
    return patched


# ---------------------------------------------------------------------- names


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "", ".hidden", "x\\y", "/abs", "C:x"])
def test_output_name_with_a_path_is_refused(training, loras, bad):
    with pytest.raises(ValueError, match="plain file name"):
        _train(training, name=bad)
    assert list(loras.iterdir()) == []


# ---------------------------------------------------------------------- a real run


def _denoise(patcher, x_vp, t, ctx, uctx=None, cfg=1.0):
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    dev = patcher.load_device  # the GPU where there is one; the results come back to the CPU
    ms = patcher.get_model_object("model_sampling")
    sigma = ms.sigmas[t.to(ms.sigmas.device)].float().to(dev)
    a = (1.0 / (1.0 + sigma ** 2)).view(-1, 1, 1, 1)
    x_ve = x_vp.to(dev) / a.sqrt()
    s = sigma.view(-1, 1, 1, 1)

    def eps(c):
        c = c.to(dev).expand(x_vp.shape[0], -1, -1)
        return (x_ve - patcher.model.apply_model(x_ve, sigma, c_crossattn=c).float()) / s

    e = eps(ctx)
    if cfg != 1.0:
        eu = eps(uctx)
        e = eu + cfg * (e - eu)
    return e.cpu(), a.flatten().cpu()


class EvalLoss(train.Callback):
    """The TSCD loss of the current student and EMA on four fixed batches (fixed generators)."""

    def __init__(self):
        self.values = []

    def evaluate(self, trainer):
        term, stage = trainer.stages[0].terms[0][1], trainer.stages[0]
        total = 0.0
        with torch.no_grad():
            for i in range(4):
                gen = torch.Generator().manual_seed(100 + i)
                x0, cond = trainer.data.sample(6, gen, trainer.device)
                total += float(term(train.Batch(x0, cond), stage, gen)[0])
        trainer.adapters.set_mode("student")
        return total / 4

    def on_stage_start(self, trainer, index, stage):
        self.values.append(self.evaluate(trainer))

    def on_end(self, trainer):
        self.values.append(self.evaluate(trainer))


def test_a_model_built_under_inference_mode_and_moved_afterwards_trains(training, loras):
    """On a GPU every weight is such a tensor: ComfyUI's loaders build the model under inference
    mode and model management moves it to the device outside it, which leaves parameters that no
    longer say they are inference tensors yet have no version counter (the first step failed with
    "Inference tensors do not track version counter", found on an H200). A dtype round trip does
    to each parameter what the move to the GPU does, so the CPU shows it too."""
    from ComfyUI_HyperSD.hypersd_core import lora_train

    model = _model()
    with torch.inference_mode(False):
        model.model.to(torch.float64).to(torch.float32)
    assert all(lora_train.untracked(p) and not p.is_inference() for p in model.model.parameters())
    with pytest.raises(RuntimeError, match="version counter"), torch.no_grad():
        model.model.diffusion_model.time_embed[0](torch.zeros(1, 32))
    out, path, trainer = _train(training, model=model, stages="1", steps_per_stage=2, name="moved")
    assert trainer.step == 2 and all(math.isfinite(x) for x in trainer.history)
    assert (loras / "moved.safetensors").exists()


def test_short_run_lowers_the_error_and_saves_a_loadable_lora(training, loras, caplog):
    base = _model()
    ev = EvalLoss()
    out, path, trainer = _train(training, model=base, stages="2", steps_per_stage=30, learning_rate=1e-3,
                                teacher_cfg=7.0, batch_size=6, rank=8, lora_scope="all", name="short",
                                checkpoint_every=15, callbacks=[ev])
    before, after = ev.values
    assert after < 0.92 * before, (before, after)
    assert Path(path) == loras / "short.safetensors"
    assert sorted(p.name for p in loras.iterdir()) == ["short.hypersd-state", "short.safetensors"]
    import folder_paths

    listed = folder_paths.get_filename_list("loras")  # what every LoRA dropdown offers
    assert "short.safetensors" in listed and not any("hypersd-state" in n for n in listed)
    sd, meta = _read(path)
    assert meta["hypersd.trained_by"] == "ComfyUI-HyperSD" and meta["hypersd.method"] == "tscd"
    assert meta["hypersd.family"] == "SD1.5" and meta["hypersd.stages"] == "2"
    assert (meta["hypersd.steps_per_stage"], meta["hypersd.rank"], meta["hypersd.step"]) == ("30", "8", "30")
    assert (meta["hypersd.recommended_steps"], meta["hypersd.recommended_sampler"]) == ("2", "tcd")
    assert meta["hypersd.recommended_eta"] == "0.3"  # TCD on the trailing grid (metadata.TRAINED_NSTEP_ETA)
    assert meta["hypersd.recommended_schedule"] == "trailing" and meta["hypersd.recommended_cfg"] == "1.0"
    assert all(k.startswith("lora_unet_") for k in sd)
    assert any(k.endswith(".alpha") for k in sd)
    # The file applied by core's loader gives the node's output model.
    patched = _assert_loads_cleanly(base, sd, caplog)
    lat, pos, _ = _data()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([999, 400])
    e_out, _ = _denoise(out, x, t, pos[0][0])
    e_file, _ = _denoise(patched, x, t, pos[0][0])
    e_base, _ = _denoise(base, x, t, pos[0][0])
    torch.testing.assert_close(e_out, e_file)
    assert not torch.allclose(e_out, e_base)
    # The shared base module is left as it was: no peft layer remains.
    assert not any("lora" in n for n, _ in base.model.diffusion_model.named_parameters())


def test_cancel_stops_within_a_step_and_resume_continues_exactly(training, loras, caplog):
    import comfy.model_management as mm

    class CancelAt(train.Callback):
        def __init__(self):
            self.started = []

        def on_step_start(self, trainer):
            self.started.append(trainer.step)

        def on_step_end(self, trainer, loss, logs):
            if trainer.step == 2:
                mm.interrupt_current_processing(True)

    cancel = CancelAt()
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _train(training, name="run", callbacks=[cancel])
    finally:
        mm.interrupt_current_processing(False)
    assert cancel.started == [0, 1]  # the step after the Cancel never began
    sd, meta = _read(loras / "run.safetensors")
    assert meta["hypersd.step"] == "2" and meta["hypersd.complete"] == "false"
    _assert_loads_cleanly(_model(), sd, caplog)
    saved = torch.load(loras / "run.hypersd-state", weights_only=True)
    assert saved["step"] == 2

    class Watch(train.Callback):
        first = None

        def on_step_start(self, trainer):
            if self.first is None:
                self.first = trainer.step
                st = trainer.optimizer.state_dict()["state"]
                for i, s in saved["optimizer"]["state"].items():
                    torch.testing.assert_close(st[i]["exp_avg"].cpu(), s["exp_avg"], rtol=0, atol=0)
                    torch.testing.assert_close(st[i]["exp_avg_sq"].cpu(), s["exp_avg_sq"], rtol=0, atol=0)
                    assert int(st[i]["step"]) == int(s["step"]) == 2

    watch = Watch()
    _, _, resumed = _train(training, name="run", callbacks=[watch])
    assert watch.first == 2 and resumed.step == 2 * STEPS
    _, _, straight = _train(training, name="straight")
    a, _ = _read(loras / "run.safetensors")
    b, _ = _read(loras / "straight.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert resumed.history == straight.history


def test_resume_refuses_other_settings_and_foreign_files(training, loras):
    _train(training, name="r", steps_per_stage=1)
    with pytest.raises(ValueError, match="cannot resume.*rank"):
        _train(training, name="r", steps_per_stage=1, rank=8)
    (loras / "foreign.safetensors").write_bytes(b"not ours")
    with pytest.raises(ValueError, match="no training state"):
        _train(training, name="foreign")
    assert (loras / "foreign.safetensors").read_bytes() == b"not ours"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(training, loras, caplog):
    class Poison(train.Callback):
        def on_step_end(self, trainer, loss, logs):
            if trainer.step == 3:
                with torch.no_grad():
                    trainer.adapters.student_parameters()[0].fill_(float("nan"))

    with pytest.raises(RuntimeError, match=r"NaN.*step 4.*last good checkpoint \(step 3\)"):
        _train(training, name="nan", checkpoint_every=1, callbacks=[Poison()])
    sd, meta = _read(loras / "nan.safetensors")
    assert meta["hypersd.step"] == "3"
    assert all(bool(torch.isfinite(v).all()) for v in sd.values())
    _assert_loads_cleanly(_model(), sd, caplog)
    # the stage-1 LoRA was saved at step 3, before the poison
    assert sorted(p.name for p in loras.iterdir()) == ["nan.hypersd-state", "nan.safetensors",
                                                       "nan_stage1_k2.safetensors"]


# ---------------------------------------------------------------------- one LoRA per stage


def test_each_stage_saves_its_own_k_step_lora(training, loras, caplog):
    from ComfyUI_HyperSD.hypersd_core import lora_file

    _train(training, name="prog", lora_scope="all")
    assert sorted(p.name for p in loras.iterdir()) == ["prog.hypersd-state", "prog.safetensors",
                                                       "prog_stage1_k2.safetensors"]
    stage_sd, meta = _read(loras / "prog_stage1_k2.safetensors")
    assert (meta["hypersd.stages"], meta["hypersd.run_stages"], meta["hypersd.step"]) == ("2", "2,1", str(STEPS))
    assert meta["hypersd.complete"] == "true" and meta["hypersd.total_steps"] == str(STEPS)
    assert (meta["hypersd.recommended_steps"], meta["hypersd.recommended_sampler"],
            meta["hypersd.recommended_schedule"]) == ("2", "tcd", "trailing")
    final_sd, final_meta = _read(loras / "prog.safetensors")
    assert final_meta["hypersd.stages"] == "2,1" and final_meta["hypersd.recommended_sampler"] == "tcd"
    assert any(not torch.equal(stage_sd[k], final_sd[k]) for k in final_sd)  # stage 2 trained on
    _assert_loads_cleanly(_model(), stage_sd, caplog)
    info = lora_file.inspect_file(str(loras / "prog_stage1_k2.safetensors"))
    assert (info.variant, info.steps, info.sampler, info.schedule, info.stages) == ("hypersd_trained", 2, "tcd",
                                                                                   "trailing", [2])
    assert not info.warnings
    # The stage file is exactly what a run of that stage alone ends with (same seed, same steps).
    _train(training, name="alone", stages="2", lora_scope="all", save_stages=False)
    alone, _ = _read(loras / "alone.safetensors")
    assert alone.keys() == stage_sd.keys()
    for k in alone:
        torch.testing.assert_close(alone[k], stage_sd[k], rtol=0, atol=0)
    _train(training, name="nostages", save_stages=False, steps_per_stage=1)
    assert not list(loras.glob("nostages_stage*"))


def test_cosine_schedule_restarts_in_every_stage_and_is_part_of_the_resume_settings(training, loras):
    seen = []

    class Rates(train.Callback):
        def on_step_end(self, trainer, loss, logs):
            seen.append(logs["lr"])

    _, path, _ = _train(training, name="cos", stages="1,1", steps_per_stage=4, learning_rate=1e-3,
                        lr_schedule="cosine", callbacks=[Rates()])
    per_stage = [train.learning_rate_at(1e-3, "cosine", j, 4) for j in range(4)]
    assert seen == pytest.approx(per_stage * 2) and seen[3] == pytest.approx(1e-4)
    _, meta = _read(path)
    assert meta["hypersd.lr_schedule"] == "cosine"
    with pytest.raises(ValueError, match="cannot resume.*lr_schedule"):
        _train(training, name="cos", stages="1,1", steps_per_stage=4, learning_rate=1e-3)


# ---------------------------------------------------------------------- out of memory


def test_out_of_memory_keeps_the_last_step_and_says_what_to_change(training, loras):
    class Exhaust(train.Callback):
        def on_step_start(self, trainer):
            if trainer.step == 2:  # a real allocation failure of torch's allocator, mid-run
                torch.empty(2 ** 62, dtype=torch.uint8)

    with pytest.raises(torch.OutOfMemoryError) as err:
        _train(training, name="oom", rank=32, lora_scope="all", callbacks=[Exhaust()])
    msg = str(err.value)
    assert isinstance(err.value, train.TrainingOutOfMemory)
    assert "ran out of memory at step 3/6" in msg and "weights of step 2 are saved" in msg
    for tip in ("turn on gradient_checkpointing", "lower batch_size (now 3; try 1)", "lora_scope to 'transformer'",
                "lower rank (now 32)", "smaller images (latents now 8x8)"):
        assert tip in msg, tip
    _, meta = _read(loras / "oom.safetensors")
    assert meta["hypersd.step"] == "2" and meta["hypersd.complete"] == "false"
    # The advice works: with gradient checkpointing on, the run resumes from step 2 and finishes.
    _, _, trainer = _train(training, name="oom", rank=32, lora_scope="all", gradient_checkpointing=True)
    assert trainer.step == 6 and len(trainer.history) == 6
    _, meta = _read(loras / "oom.safetensors")
    assert meta["hypersd.complete"] == "true"


# ---------------------------------------------------------------------- full or read-only folder


def test_full_disk_fails_clearly_and_leaves_no_broken_file(training, loras):
    old = loras / "full.safetensors"
    old.write_bytes(b"previous file")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    prev = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # writes past 4 KiB fail with EFBIG
    try:
        with pytest.raises(files.FileSaveError, match="could not save.*read-only or the disk full"):
            _train(training, name="full", resume=False, steps_per_stage=1)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, prev)
    assert old.read_bytes() == b"previous file"
    assert sorted(p.name for p in loras.iterdir()) == ["full.safetensors"]  # no temp file left


def _read_only_folder(tmp: Path):
    """A folder this process cannot write: permissions, or a read-only mount when running as root."""
    folder = tmp / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return folder, lambda: folder.chmod(0o755)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("running as root without permission to mount a read-only folder")
    return folder, lambda: subprocess.run(["umount", str(folder)], capture_output=True)


def test_read_only_folder_fails_clearly(training, comfy, tmp_path):
    from hypersd_dev.fixtures import registered_folder

    folder, undo = _read_only_folder(tmp_path)
    try:
        with registered_folder("loras", folder):
            with pytest.raises(files.FileSaveError, match="could not save"):
                _train(training, name="ro", steps_per_stage=1)
        assert list(folder.iterdir()) == []
    finally:
        undo()


def test_tscd_then_score_distillation_in_the_node_cancels_and_resumes_exactly(training, loras, caplog):
    """score_steps > 0: the TSCD stages, then score distillation on the same student, in one node run.
    A Cancel inside the score stage saves the step; the resumed run restores the fake score and its
    optimizer with the student and ends bit-for-bit where an uninterrupted run ends. The unified LoRA
    loads in core's loader with every key used and recommends TCD at one step."""
    import comfy.model_management as mm

    kw = dict(stages="2", steps_per_stage=1, score_steps=3, fake_updates=2, regression_weight=0.5)

    class CancelAt(train.Callback):
        def on_step_end(self, trainer, loss, logs):
            if trainer.step == 2:
                assert logs["stage"] == "score" and {"fake_loss", "dmd_loss", "regression_loss"} <= set(logs)
                mm.interrupt_current_processing(True)

    try:
        with pytest.raises(mm.InterruptProcessingException):
            _train(training, name="sd", callbacks=[CancelAt()], **kw)
    finally:
        mm.interrupt_current_processing(False)
    saved = torch.load(loras / "sd.hypersd-state", weights_only=True)
    assert saved["step"] == 2 and set(saved["terms"]) == {"1.0"}
    assert int(saved["terms"]["1.0"]["fake_optimizer"]["state"][0]["step"]) == 2  # one score step, 2 fake updates
    _, _, resumed = _train(training, name="sd", **kw)
    _, _, straight = _train(training, name="sd_straight", **kw)
    assert resumed.step == straight.step == 4 and resumed.history == straight.history
    a, meta = _read(loras / "sd.safetensors")
    b, _ = _read(loras / "sd_straight.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert (meta["hypersd.score_steps"], meta["hypersd.recommended_sampler"], meta["hypersd.recommended_steps"]) == (
        "3", "tcd", "1")
    assert meta["hypersd.recommended_eta_by_steps"] == "1:1.0,2:1.0,4:1.0,8:0.6"  # the unified eta per step count
    _assert_loads_cleanly(_model(), a, caplog)
    stage, stage_meta = _read(loras / "sd_stage1_k2.safetensors")  # the TSCD result before score distillation
    assert stage_meta["hypersd.recommended_schedule"] == "trailing" and set(stage) == set(a)


def test_a_finished_tscd_run_continues_with_score_distillation(training, loras):
    """Queued again with score_steps > 0 and resume on, a finished TSCD run is not trained again: it
    continues from its saved state into the score stage, keeps its TSCD result as the last stage's
    file and ends where one uninterrupted TSCD + score run ends."""
    tscd_only = dict(stages="2", steps_per_stage=1)
    score = dict(score_steps=2, fake_updates=2, regression_weight=0.5)
    _train(training, name="cont", resume=False, **tscd_only)
    tscd_lora, _ = _read(loras / "cont.safetensors")
    assert not (loras / "cont_stage1_k2.safetensors").exists()
    _, _, continued = _train(training, name="cont", resume=True, **tscd_only, **score)
    _, _, straight = _train(training, name="cont_straight", resume=False, **tscd_only, **score)
    assert continued.step == straight.step == 3 and continued.history == straight.history
    kept, kept_meta = _read(loras / "cont_stage1_k2.safetensors")
    assert kept_meta["hypersd.recommended_schedule"] == "trailing" and all(torch.equal(kept[k], tscd_lora[k]) for k in kept)
    a, meta = _read(loras / "cont.safetensors")
    b, _ = _read(loras / "cont_straight.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (meta["hypersd.score_steps"], meta["hypersd.recommended_sampler"]) == ("2", "tcd")


def test_a_state_saved_by_an_earlier_version_resumes_and_is_replaced(training, loras):
    """Earlier versions saved ``<name>.hypersd-state.pt``, which every LoRA dropdown listed; such a
    run still resumes (here: a finished TSCD run continued by score distillation; without its state
    it would be refused), and its state moves to the new name, out of the lists, at the next save."""
    _train(training, name="old", resume=False, stages="2", steps_per_stage=1)
    (loras / "old.hypersd-state").rename(loras / "old.hypersd-state.pt")
    _train(training, name="old", resume=True, stages="2", steps_per_stage=1, score_steps=2, fake_updates=1,
           regression_weight=0.0)
    assert sorted(p.name for p in loras.iterdir()) == ["old.hypersd-state", "old.safetensors",
                                                       "old_stage1_k2.safetensors"]
    assert torch.load(loras / "old.hypersd-state", weights_only=True)["step"] == 3
