"""HyperSDTrainFeedback and HyperSDRewardLoader inside a real ComfyUI (in-process, CPU), on the
toy: its teacher checkpoint, VAE, 4-step TSCD LoRA and reward model."""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from ComfyUI_HyperSD.hypersd_core import lora_merge, train
from hypersd_dev import REPO
from hypersd_dev.fixtures import registered_folder

BASE_LORA = "hypersd_toy_tscd_lora_stage2_k4.safetensors"
REWARD = "hypersd_toy_reward.safetensors"


@pytest.fixture(scope="module")
def toy_parts(pack):
    import comfy.sd

    from toy import data, install

    models = Path(tempfile.gettempdir()) / "hypersd-test-files" / "toy-models"
    installed = install.install(models)
    with torch.inference_mode():  # as ComfyUI's loaders run
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(installed["checkpoint"]))
        conds = {d: clip.encode_from_tokens_scheduled(clip.tokenize(data.PROMPT.format(d))) for d in (3, 7)}
    return {"model": model, "vae": vae, "conds": conds, "data": data}


@pytest.fixture
def folders(comfy, tmp_path):
    loras, rewards_dir = tmp_path / "loras", tmp_path / "hypersd_rewards"
    loras.mkdir()
    rewards_dir.mkdir()
    shutil.copy(REPO / "toy" / "weights" / BASE_LORA, loras / BASE_LORA)
    shutil.copy(REPO / "toy" / "weights" / REWARD, rewards_dir / REWARD)
    with registered_folder("loras", loras), registered_folder("hypersd_rewards", rewards_dir):
        yield loras, rewards_dir


@pytest.fixture
def fb(pack):
    from ComfyUI_HyperSD.nodes import feedback

    return feedback


def _latents(toy_parts, vae, n_per_digit=4):
    """One latent, conditioning and caption per image, as Make Training Dataset and Load Image and
    Text Dataset from Folder give them (so the captions are per image, not per prompt)."""
    data = toy_parts["data"]
    split = data.split()
    lats, pos, caps = [], [], []
    for d in (3, 7):
        pages = split["train_x"][split["train_y"] == d][:n_per_digit]
        with torch.inference_mode():
            img = pages.unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()
            lat = vae.encode(img)
        for i in range(n_per_digit):
            lats.append({"samples": lat[i:i + 1]})
            pos.append(toy_parts["conds"][d])
            caps.append(data.PROMPT.format(d))
    return lats, pos, caps


def _train(fb, toy_parts, name="fb", callbacks=(), captions=True, reward_margin=-0.05, **kw):
    lats, pos, caps = _latents(toy_parts, toy_parts["vae"])
    args = dict(stages="4", steps_per_stage=4, learning_rate=1e-3, rank=4, seed=0, batch_size=4,
                output_name=name, checkpoint_every=0, merge_ratio=0.5, structure_weight=0.5, lora_scope="all")
    args.update(kw)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        terms = [fb.load_reward(REWARD, reward_margin, 1.0)]
        return fb.train_feedback(toy_parts["model"], BASE_LORA, toy_parts["vae"], terms, lats, pos,
                                 caps if captions else None, positive_per_latent=True,
                                 callbacks=tuple(callbacks), **args)


def _read(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


class RewardProbe(train.Callback):
    """The mean reward of the student's 4-step pictures from fixed noises, at the start and the end."""

    def __init__(self):
        self.values = []

    def measure(self, trainer):
        term = trainer.stages[0].terms[0][1]
        total = 0.0
        with torch.no_grad():
            for cond in (0, 1):
                gen = torch.Generator().manual_seed(50 + cond)
                z = torch.randn(8, 4, 8, 8, generator=gen).to(trainer.device)
                x = term.run_to(z, 3, cond, gen)
                images = term.decode(term.one_step_x0(x, term.grid[3], cond))
                total += float(term.rewards[0].reward(images, term.labels(cond, 8, images.device)).mean())
        trainer.adapters.set_mode("student")
        return total / 2

    def on_run_start(self, trainer):
        self.values.append(self.measure(trainer))

    def on_end(self, trainer):
        self.values.append(self.measure(trainer))


def test_feedback_raises_the_reward_and_saves_a_merged_lora_that_core_loads(fb, toy_parts, folders, caplog):
    import comfy.model_management
    import comfy.sd

    loras, _ = folders
    probe = RewardProbe()
    out, merged_path, own_path, trainer = _train(fb, toy_parts, name="fb", steps_per_stage=32, learning_rate=3e-3, batch_size=8,
                                                 callbacks=[probe], reward_margin=0.0, structure_weight=0.0)
    before, after = probe.values
    print(f"reward of the 4-step pictures: {before:.4f} -> {after:.4f}")
    assert after > before + 0.05, (before, after)  # log-probability of the prompted digit, by the reward model
    assert Path(merged_path) == loras / "fb.safetensors" and Path(own_path) == loras / "fb_feedback.safetensors"
    assert sorted(p.name for p in loras.iterdir()) == sorted([BASE_LORA, "fb.safetensors", "fb_feedback.safetensors",
                                                              "fb.hypersd-state"])
    merged, meta = _read(merged_path)
    own, own_meta = _read(own_path)
    base, base_meta = _read(loras / BASE_LORA)
    # the merged file keeps the 4-step LoRA's recipe and says what was trained
    assert (meta["hypersd.recommended_steps"], meta["hypersd.recommended_sampler"],
            meta["hypersd.recommended_schedule"]) == ("4", "tcd", "trailing")
    assert meta["hypersd.feedback_ratio"] == "0.5" and meta["hypersd.feedback_on"].startswith(BASE_LORA + "@")
    assert meta["hypersd.feedback_rewards"] == "hypersd_toy_reward:0:1" and "feedback_only" in "".join(own_meta)
    # core's loader: every key matched
    caplog.clear()
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        m_merged, _ = comfy.sd.load_lora_for_models(toy_parts["model"], None, merged, 1.0, 0)
        m_both, _ = comfy.sd.load_lora_for_models(toy_parts["model"], None, base, 1.0, 0)
        m_both, _ = comfy.sd.load_lora_for_models(m_both, None, own, 0.5, 0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    # the merged LoRA = the two applied together (the 4-step LoRA at 1, the feedback at 0.5)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([2.0, 2.0])
    ctx = toy_parts["conds"][7][0][0].expand(2, -1, -1)
    outs = []
    with torch.inference_mode():
        for m in (m_merged, m_both, out):
            comfy.model_management.load_models_gpu([m])
            outs.append(m.model.apply_model(x, sigma, c_crossattn=ctx).float())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-4, atol=1e-4)  # the node's model output is the merged one
    assert any(float(lora_merge.delta(own, k[: -len(".lora_up.weight")]).abs().max()) > 0
               for k in own if k.endswith(".lora_up.weight"))


def test_a_cancelled_feedback_run_resumes_to_the_same_loras(fb, toy_parts, folders):
    loras, _ = folders

    import comfy.model_management as mm

    class CancelAt(train.Callback):  # the Cancel button: ComfyUI's interrupt flag, seen at the next step
        def on_step_end(self, trainer, loss, logs):
            if trainer.step == 2:
                mm.interrupt_current_processing(True)

    # the scored steps, the anchor and the LoRA's own eta (not the defaults) are part of what resumes
    opts = {"scored_steps": "whole schedule", "anchor_weight": 2.0, "eta_of_lora": True}
    _, _, own_a, trainer_a = _train(fb, toy_parts, name="whole", **opts)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _train(fb, toy_parts, name="cut", callbacks=[CancelAt()], **opts)
    finally:
        mm.interrupt_current_processing(False)
    _, meta = _read(loras / "cut.safetensors")
    assert (meta["hypersd.feedback_step"], meta["hypersd.complete"]) == ("2", "false")
    assert (meta["hypersd.feedback_scored_steps"], meta["hypersd.feedback_anchor_weight"]) == ("whole schedule", "2.0")
    assert meta["hypersd.feedback_eta_by_steps"] == "4:0.3"  # the 4-step LoRA's recipe: TCD, eta 0.3
    for other in ({"scored_steps": "late half"}, {"anchor_weight": 0.0}, {"eta_of_lora": False}):
        with pytest.raises(ValueError, match="different settings"):
            _train(fb, toy_parts, name="cut", **{**opts, **other})
    _, _, own_b, trainer_b = _train(fb, toy_parts, name="cut", **opts)
    assert trainer_b.history == pytest.approx(trainer_a.history, rel=1e-5, abs=1e-6)
    a, _ = _read(own_a)
    b, _ = _read(own_b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="different settings"):
        _train(fb, toy_parts, name="cut", structure_weight=1.0, **opts)


def test_eta_of_lora_is_the_eta_each_step_count_samples_at(fb, comfy, tmp_path):
    """``eta_of_lora``: a unified LoRA's own table (the toy's: 1 at one step, 0.3 at two, 0.6 at four),
    a TCD-sampled N-step LoRA's eta, 0 for a DDIM one."""
    import dataclasses

    loras = tmp_path / "loras"
    loras.mkdir()
    for name in ("hypersd_toy_tscd_lora.safetensors", BASE_LORA):
        shutil.copy(REPO / "toy" / "weights" / name, loras / name)
    with registered_folder("loras", loras):
        *_, unified = fb.base_lora("hypersd_toy_tscd_lora.safetensors", "SD1.5")
        *_, k4 = fb.base_lora(BASE_LORA, "SD1.5")
    assert fb.lora_etas(unified, "1,2,4,8") == ((1, 1.0), (2, 0.3), (4, 0.6), (8, 0.3))
    assert fb.lora_etas(k4, "4") == ((4, 0.3),)
    ddim = dataclasses.replace(k4, sampler="ddim", eta=0.0)
    assert fb.lora_etas(ddim, "4") == ((4, 0.0),)


def test_bad_inputs_are_refused_before_anything_is_written(fb, toy_parts, folders):
    loras, rewards_dir = folders
    before = sorted(p.name for p in loras.iterdir())
    with pytest.raises(ValueError, match="connect 'captions'"):
        _train(fb, toy_parts, name="nocap", captions=False)
    with pytest.raises(ValueError, match="pick a reward file"):
        fb.load_reward("../loras/" + BASE_LORA, 0.0, 1.0)
    with pytest.raises(ValueError, match="not in models/hypersd_rewards"):
        fb.load_reward("missing.safetensors", 0.0, 1.0)
    shutil.copy(loras / BASE_LORA, rewards_dir / "a_lora.safetensors")
    with pytest.raises(ValueError, match="not a Hyper-SD reward file"):
        fb.load_reward("a_lora.safetensors", 0.0, 1.0)
    with pytest.raises(ValueError, match="plain file name"):
        _train(fb, toy_parts, name="../x")
    (loras / "broken.safetensors").write_bytes(b"\x00" * 16)
    with torch.inference_mode(), pytest.raises(ValueError, match="cannot train feedback on 'broken.safetensors'"):
        fb.base_lora("broken.safetensors", "SD1.5")
    with pytest.raises(ValueError, match="merge_ratio"):
        _train(fb, toy_parts, name="ratio", merge_ratio=3.0)
    assert sorted(p.name for p in loras.iterdir()) == sorted(before + ["broken.safetensors"])
