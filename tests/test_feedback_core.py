"""Human feedback learning core (hypersd_core.feedback, rewards, lora_merge) in plain torch:
the hinge and one-step x0 by hand, where the gradient goes, the exact merge, reward files,
a feedback run through the pipeline with exact resume."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from ComfyUI_HyperSD.hypersd_core import feedback, lora_merge, lora_train, rewards, train
from ComfyUI_HyperSD.hypersd_core.data import LatentData
from ComfyUI_HyperSD.hypersd_core.pipeline import FeedbackParts, RunFiles, TrainingRun, TrainSettings
from test_tscd_core import TinyEps


def _schedule():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    return torch.cumprod(1 - betas, 0)


def _reward(seed=3, classes=3):
    torch.manual_seed(seed)
    clf = rewards.ConvClassifier((4, 8), size=8, in_channels=3, classes=classes)
    return rewards.ClassifierReward(clf, [str(i) for i in range(classes)], name="tiny")


class Decoder(torch.nn.Module):
    """latent [B, 4, 8, 8] -> image [B, 3, 8, 8] in [0, 1]: a frozen 1x1 convolution and a sigmoid."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3, 1)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, z):
        return torch.sigmoid(self.conv(z))


def _setup(seed=0, margin=0.0, structure_weight=0.0, sample_steps=2, eta=0.0):
    torch.manual_seed(1234)
    net, decoder = TinyEps(), Decoder()
    ab = _schedule()
    cond = torch.randn(2, 8, generator=torch.Generator().manual_seed(9))

    def eps_fn(x, t, cfg, c):
        return net(x, t, cond[int(c or 0)].expand(x.shape[0], -1))

    adapters = lora_train.LoraAdapters(net, lora_train.select_targets(net, "all"), rank=2, seed=seed)
    reward = _reward()
    term = feedback.FeedbackLoss(eps_fn, adapters, ab, decode=decoder, sample_steps=sample_steps, eta=eta,
                                 rewards=[feedback.RewardTerm(reward, margin=margin, weight=1.0)],
                                 structure_weight=structure_weight, prompt_labels=[2, 0])
    gen = torch.Generator().manual_seed(5)
    data = LatentData([(torch.randn(4, 4, 8, 8, generator=gen), 0), (torch.randn(4, 4, 8, 8, generator=gen), 1)])
    return net, decoder, adapters, reward, term, eps_fn, ab, data


def test_hinge_and_one_step_x0_by_hand():
    r = torch.tensor([-2.0, -0.5, 0.0, 0.7])
    torch.testing.assert_close(rewards.hinge(r, -0.5), torch.tensor([1.5, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(rewards.hinge(r, 1.0), torch.tensor([3.0, 1.5, 1.0, 0.3]))
    net, _, adapters, _, term, eps_fn, ab, _ = _setup()
    x_t = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        got = term.one_step_x0(x_t, 499, 1)
        eps = eps_fn(x_t, torch.tensor([499, 499]), 1.0, 1)
    a = ab[499]
    torch.testing.assert_close(got, (x_t - (1 - a).sqrt() * eps) / a.sqrt())


def test_the_schedule_runs_to_a_late_step_as_ddim_or_tcd():
    """Step 2 by hand: DDIM moves at eta 0; TCD's move lands at s' = (1 - eta) s and is noised back to s."""
    net, _, adapters, _, term, eps_fn, ab, _ = _setup(sample_steps=4)
    assert term.grid == [999, 749, 499, 249]
    gen = torch.Generator().manual_seed(0)
    assert {feedback.late_index(4, gen) for _ in range(50)} == {2, 3}  # the later half
    assert {feedback.late_index(1, gen) for _ in range(5)} == {0}
    assert {feedback.late_index(4, gen, feedback.late_fraction_of("whole schedule")) for _ in range(80)} == {0, 1, 2, 3}
    assert {feedback.late_index(4, gen, feedback.late_fraction_of("late half")) for _ in range(50)} == {2, 3}
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        e = eps_fn(z, torch.tensor([999]), 1.0, 0)
        x0 = (z - (1 - ab[999]).sqrt() * e) / ab[999].sqrt()
        ddim = ab[749].sqrt() * x0 + (1 - ab[749]).sqrt() * e
        torch.testing.assert_close(term.run_to(z, 1, 0, gen), ddim)
        g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
        tcd = feedback.sampler_move(z, e, ab, 999, 749, 0.5, g1)
        sp = math.floor(0.5 * 749)
        n = torch.randn(z.shape, generator=g2)
        x_sp = ab[sp].sqrt() * x0 + (1 - ab[sp]).sqrt() * e
        r = ab[749] / ab[sp]
        torch.testing.assert_close(tcd, r.sqrt() * x_sp + (1 - r).sqrt() * n)


def test_gradient_reaches_the_feedback_adapter_only_through_decoder_and_reward():
    net, decoder, adapters, reward, term, _, _, data = _setup()
    base = [p for n, p in net.named_parameters() if "lora_" not in n]
    x0, cond = data.sample(3, torch.Generator().manual_seed(1), torch.device("cpu"), torch.float32)
    batch = train.Batch(x0=x0, cond=cond, step=0)
    loss, logs = term(batch, train.Stage(segments=2, steps=1), torch.Generator().manual_seed(2))
    assert loss.requires_grad and "reward_tiny" in logs and logs["feedback_t"] in (999, 499)
    loss.backward()
    grads = [p.grad for p in adapters.student_parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)  # the feedback LoRA learns
    assert all(p.grad is None for p in base)  # the base (with the frozen LoRA merged in) does not
    assert all(p.grad is None for p in adapters.ema_parameters())
    assert all(p.grad is None for p in decoder.parameters()) and all(p.grad is None for p in reward.parameters())
    # a hinge every picture already clears gives no gradient: it came through the reward
    _, _, adapters2, _, term2, _, _, _ = _setup(margin=-1e6)
    loss2, _ = term2(train.Batch(x0=x0, cond=cond, step=0), train.Stage(segments=2, steps=1),
                     torch.Generator().manual_seed(2))
    assert float(loss2.detach()) == 0.0
    loss2.backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0.0 for p in adapters2.student_parameters())


def test_the_anchor_is_the_distance_to_the_frozen_loras_one_step_picture():
    """L_anchor = mean((x0 - x0_frozen)^2) at the same x_t, the frozen side without gradient: 0 while
    the feedback adapter is a no-op; after a change, the hand-computed distance; with a hinge every
    picture clears, its gradient alone reaches the feedback adapter and pulls it back."""
    net, decoder, adapters, reward, _, eps_fn, ab, data = _setup()
    term = feedback.FeedbackLoss(eps_fn, adapters, ab, decode=decoder, sample_steps=2, anchor_weight=3.0,
                                 rewards=[feedback.RewardTerm(reward, margin=-1e6)], prompt_labels=[2, 0])
    x0, cond = data.sample(3, torch.Generator().manual_seed(1), torch.device("cpu"), torch.float32)
    stage = train.Stage(segments=2, steps=1)
    loss, logs = term(train.Batch(x0=x0, cond=cond), stage, torch.Generator().manual_seed(2))
    assert logs["anchor_loss"] == 0.0 and float(loss.detach()) == 0.0
    with torch.no_grad():
        for p in adapters.student_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    gen = torch.Generator().manual_seed(2)
    loss, logs = term(train.Batch(x0=x0, cond=cond), stage, gen)
    # by hand: the same draws (noise, late step), the student's and the frozen one-step x0
    g = torch.Generator().manual_seed(2)
    z = train.Batch(x0=x0).randn(g, x0)
    j = feedback.late_index(2, g)
    assert term.grid[j] == logs["feedback_t"]
    with torch.no_grad():
        x_t = term.run_to(z, j, cond, g)
        mine = term.one_step_x0(x_t, term.grid[j], cond)
        adapters.set_mode("teacher")
        frozen = term.one_step_x0(x_t, term.grid[j], cond)
        adapters.set_mode("student")
    expected = float(((mine - frozen) ** 2).mean())
    assert expected > 0 and logs["anchor_loss"] == pytest.approx(expected, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(3.0 * expected, rel=1e-5)
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in adapters.student_parameters())
    assert all(p.grad is None for n, p in net.named_parameters() if "lora_" not in n)
    with pytest.raises(ValueError, match="anchor weight must be 0"):
        feedback.check_settings(2, 0.0, 0.0, anchor_weight=-1.0)
    assert "anchor_weight" not in TrainSettings(method="feedback", stages="2").signature()
    assert TrainSettings(method="feedback", stages="2", anchor_weight=0.5).signature()["anchor_weight"] == 0.5


def test_the_aesthetic_loss_is_the_weighted_hinge_of_each_reward():
    net, decoder, adapters, reward, term, _, _, _ = _setup()
    images = torch.rand(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 1])
    other = _reward(seed=7)
    other.name = "other"
    term.rewards = [feedback.RewardTerm(reward, margin=-0.5, weight=2.0), feedback.RewardTerm(other, margin=0.0,
                                                                                                 weight=0.5)]
    loss, logs = term.aesthetic(images, labels)
    with torch.no_grad():
        r1 = torch.log_softmax(reward.classifier(images), -1)[torch.arange(4), labels]
        r2 = torch.log_softmax(other.classifier(images), -1)[torch.arange(4), labels]
    want = 2.0 * torch.relu(-0.5 - r1).mean() + 0.5 * torch.relu(0.0 - r2).mean()
    torch.testing.assert_close(loss, want)
    assert logs["reward_tiny"] == pytest.approx(float(r1.mean())) and logs["reward_other"] == pytest.approx(float(r2.mean()))


def test_structure_term_is_the_rewards_supervised_loss_on_real_latents_and_is_backpropagated_early():
    net, decoder, adapters, reward, term, _, _, data = _setup(structure_weight=0.5)
    x0, cond = data.sample(2, torch.Generator().manual_seed(1), torch.device("cpu"), torch.float32)
    batch = train.Batch(x0=x0, cond=cond, step=0, backward_scale=1.0)
    loss, logs = term(batch, train.Stage(segments=2, steps=1), torch.Generator().manual_seed(2))
    early = [p.grad.clone() for p in adapters.student_parameters() if p.grad is not None]
    assert early, "the structure term was not backpropagated before the aesthetic term"
    assert logs["structure_loss"] > 0
    g = torch.Generator().manual_seed(2)
    t = int(torch.randint(feedback.STRUCTURE_T[0], feedback.STRUCTURE_T[1] + 1, (1,), generator=g))
    n = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        a = _schedule()[t]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * n
        want = reward.supervised_loss(decoder(term.one_step_x0(x_t, t, cond)), term.labels(cond, 2, "cpu"))
    assert logs["structure_loss"] == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(ValueError, match="supervised loss"):
        class Plain:
            name, needs_labels = "plain", False

            def __call__(self, images, labels):
                return images.mean(dim=(1, 2, 3))
        feedback.FeedbackLoss(lambda *a: None, adapters, _schedule(), decode=decoder, sample_steps=2,
                              rewards=[feedback.RewardTerm(Plain())], structure_weight=1.0)


def _kohya(seed, rank, alpha):
    g = torch.Generator().manual_seed(seed)
    return {"lin.lora_down.weight": torch.randn(rank, 6, generator=g), "lin.lora_up.weight": torch.randn(5, rank, generator=g),
            "lin.alpha": torch.tensor(float(alpha)),
            "conv.lora_down.weight": torch.randn(rank, 3, 3, 3, generator=g),
            "conv.lora_up.weight": torch.randn(4, rank, 1, 1, generator=g), "conv.alpha": torch.tensor(float(alpha))}


def test_merge_is_exact_rank_concatenation():
    a, b = _kohya(1, 4, 4), _kohya(2, 2, 1)
    b["only_b.lora_down.weight"] = torch.randn(2, 7)
    b["only_b.lora_up.weight"] = torch.randn(3, 2)
    merged = lora_merge.merge_cat(a, b, 1.0, 0.6)
    assert merged["lin.lora_down.weight"].shape == (6, 6) and float(merged["lin.alpha"]) == 6.0
    for pre in ("lin", "conv"):
        want = lora_merge.delta(a, pre, 1.0) + lora_merge.delta(b, pre, 0.6)
        torch.testing.assert_close(lora_merge.delta(merged, pre), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora_merge.delta(merged, "only_b"), lora_merge.delta(b, "only_b", 0.6))
    # outputs of a layer with the merged LoRA = with both applied together
    lin = torch.nn.Linear(6, 5)
    x = torch.randn(3, 6)
    both = x @ (lin.weight + lora_merge.delta(a, "lin") + lora_merge.delta(b, "lin", 0.6)).T + lin.bias
    one = x @ (lin.weight + lora_merge.delta(merged, "lin")).T + lin.bias
    torch.testing.assert_close(one, both, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kohya"):
        lora_merge.merge_cat(a, {"lin.lora_A.weight": torch.zeros(2, 6)})
    bad = dict(b)
    bad["lin.lora_down.weight"] = torch.randn(2, 9)
    with pytest.raises(ValueError, match="different shapes"):
        lora_merge.merge_cat(a, bad)


def test_reward_files_round_trip_and_backpropagate_under_inference_mode(tmp_path):
    reward = _reward()
    path = tmp_path / "r.safetensors"
    rewards.save_classifier(path, reward.classifier, reward.class_names)
    images = torch.rand(2, 3, 8, 8)
    with torch.inference_mode():  # as ComfyUI runs a node
        loaded = rewards.load_reward(path)
    with torch.no_grad():
        want = reward(images, torch.tensor([1, 2]))
    torch.testing.assert_close(loaded(images, torch.tensor([1, 2])), want, rtol=2e-3, atol=2e-3)  # fp16 file
    x = images.clone().requires_grad_(True)
    loaded(x, torch.tensor([1, 2])).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert loaded.label_of("a handwritten digit 2") == 2
    with pytest.raises(ValueError, match="exactly one of"):
        loaded.label_of("a photo of a cat")
    with pytest.raises(ValueError, match="give each prompt's class"):
        loaded(images, None)


def test_bad_reward_files_are_refused_with_what_to_do(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"x.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(ValueError, match="not a Hyper-SD reward file"):
        rewards.load_reward(lora)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        rewards.load_reward(junk)
    reward = _reward()
    good = tmp_path / "good.safetensors"
    rewards.save_classifier(good, reward.classifier, reward.class_names)
    from safetensors import safe_open
    with safe_open(str(good), framework="pt") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta["hypersd.reward_channels"] = "4,16"
    save_file(sd, str(tmp_path / "wrong.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="do not fit the architecture"):
        rewards.load_reward(tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        rewards.load_reward(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("kw,msg", [({"sample_steps": 0}, "1 to 50 steps"), ({"eta": 1.5}, "eta must be in"),
                                    ({"structure_weight": -1.0}, "structure weight")])
def test_feedback_settings_are_checked(kw, msg):
    with pytest.raises(ValueError, match=msg):
        feedback.check_settings(**{"sample_steps": 4, "eta": 0.0, "structure_weight": 0.0, **kw})


def test_scored_steps_choose_where_on_the_schedule_the_reward_scores(tmp_path):
    """'whole schedule' scores the one-step picture of the first step too (t 999 of a 2-step LoRA);
    the default keeps the paper's later half, is absent from the resume signature (states saved
    before the setting resume) and is written into the files."""
    from safetensors import safe_open

    seen = {}
    for name, fraction in feedback.SCORED_STEPS.items():
        net, _, adapters, _, _, eps_fn, ab, data = _setup()
        term = feedback.FeedbackLoss(eps_fn, adapters, ab, decode=Decoder(), sample_steps=2,
                                     rewards=[feedback.RewardTerm(_reward(), margin=0.0)], prompt_labels=[2, 0],
                                     late_fraction=fraction)
        gen = torch.Generator().manual_seed(0)
        seen[name] = {term(train.Batch(x0=data.groups[0][0][:2], cond=0), None, gen)[1]["feedback_t"]
                      for _ in range(12)}
    assert seen == {"late half": {499}, "whole schedule": {999, 499}}
    with pytest.raises(ValueError, match="scored steps must be one of 'late half', 'whole schedule'"):
        TrainSettings(method="feedback", stages="2", scored_steps="early")
    with pytest.raises(ValueError, match=r"late fraction of the schedule must be in \(0, 1\]"):
        feedback.late_index(4, torch.Generator(), 0.0)
    default = TrainSettings(method="feedback", stages="2")
    assert "scored_steps" not in default.signature()
    assert TrainSettings(method="feedback", stages="2", scored_steps="whole schedule").signature()["scored_steps"] \
        == "whole schedule"
    run, _, _ = _feedback_run(tmp_path, steps_per_stage=2, scored_steps="whole schedule")
    for path in (run.files.lora, run.files.feedback_lora):
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata()["hypersd.feedback_scored_steps"] == "whole schedule"


def _feedback_run(tmp_path, steps_per_stage=3, checkpoint_every=0, callbacks=(), resume=True, merge_ratio=0.5,
                  scored_steps="late half", **more):
    torch.manual_seed(1234)
    net, decoder = TinyEps(), Decoder()
    ab = _schedule()
    cond = torch.randn(2, 8, generator=torch.Generator().manual_seed(9))

    def eps_fn(x, t, cfg, c):
        return net(x, t, cond[int(c or 0)].expand(x.shape[0], -1))

    gen = torch.Generator().manual_seed(5)
    data = LatentData([(torch.randn(4, 4, 8, 8, generator=gen), 0), (torch.randn(4, 4, 8, 8, generator=gen), 1)])
    base = _kohya(3, 2, 2)
    parts = FeedbackParts(decode=decoder, rewards=[feedback.RewardTerm(_reward(), margin=-0.1)], base_lora=base,
                          base_metadata={"hypersd.recommended_steps": "2", "hypersd.family": "SD1.5"},
                          prompt_labels=[2, 0])
    settings = TrainSettings(method="feedback", stages="2", steps_per_stage=steps_per_stage, learning_rate=1e-2,
                             rank=2, batch_size=2, lora_scope="all", checkpoint_every=checkpoint_every,
                             structure_weight=0.5, merge_ratio=merge_ratio, feedback_on="base.safetensors@abc",
                             feedback_rewards="tiny:-0.1:1", scored_steps=scored_steps, **more)
    run = TrainingRun(settings, RunFiles.create(tmp_path, "fb"), family="SD1.5", alphas_cumprod=ab,
                      prompts=2, resume=resume, parts=parts)
    trainer = run.train(net, eps_fn, data, callbacks=callbacks)
    return run, trainer, base


def test_a_feedback_run_saves_merged_and_own_lora_and_resumes_exactly(tmp_path):
    from safetensors import safe_open

    run, trainer, base = _feedback_run(tmp_path / "a", steps_per_stage=4)
    assert trainer.step == 4 and all(math.isfinite(v) for v in trainer.history)
    with safe_open(str(run.files.feedback_lora), framework="pt") as f:
        own = {k: f.get_tensor(k) for k in f.keys()}
        assert "feedback_only" in "".join(f.metadata())
    with safe_open(str(run.files.lora), framework="pt") as f:
        merged, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    assert meta["hypersd.feedback_ratio"] == "0.5" and meta["hypersd.recommended_steps"] == "2"
    for pre in ("lin", "conv"):  # the frozen LoRA's layers at 1, the feedback's at 0.5
        torch.testing.assert_close(lora_merge.delta(merged, pre), lora_merge.delta(base, pre))
    for key in own:
        if key.endswith(".lora_down.weight"):
            pre = key[: -len(".lora_down.weight")]
            torch.testing.assert_close(lora_merge.delta(merged, pre), lora_merge.delta(own, pre, 0.5))

    class StopAt(train.Callback):
        def on_step_start(self, trainer):
            if trainer.step == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _feedback_run(tmp_path / "b", steps_per_stage=4, callbacks=[StopAt()])
    run_b, trainer_b, _ = _feedback_run(tmp_path / "b", steps_per_stage=4)
    assert trainer_b.history == pytest.approx(trainer.history, rel=1e-6, abs=1e-7)
    with safe_open(str(run_b.files.feedback_lora), framework="pt") as f:
        for k in own:
            torch.testing.assert_close(f.get_tensor(k), own[k], rtol=1e-6, atol=1e-7)


def test_the_score_stage_carries_the_feedback_term_on_the_one_step_generator(tmp_path):
    """score_feedback_weight > 0: the score stage holds the feedback term at that weight, on the
    student's one-step pictures from t 999 (no run to a late step), and it needs the rewards."""
    torch.manual_seed(1234)
    net, decoder = TinyEps(), Decoder()
    cond = torch.randn(2, 8, generator=torch.Generator().manual_seed(9))

    def eps_fn(x, t, cfg, c):
        return net(x, t, cond[int(c or 0)].expand(x.shape[0], -1))

    gen = torch.Generator().manual_seed(5)
    data = LatentData([(torch.randn(4, 4, 8, 8, generator=gen), 0), (torch.randn(4, 4, 8, 8, generator=gen), 1)])
    settings = TrainSettings(stages="1", steps_per_stage=1, score_steps=2, fake_updates=1, regression_weight=0.0,
                             score_feedback_weight=0.5, feedback_rewards="tiny:0:1", learning_rate=1e-3, rank=2,
                             batch_size=2, lora_scope="all", checkpoint_every=0, teacher_cfg=2.0)
    logs = []

    class Logs(train.Callback):
        def on_step_end(self, trainer, loss, step_logs):
            logs.append(step_logs)

    parts = FeedbackParts(decode=decoder, rewards=[feedback.RewardTerm(_reward())], prompt_labels=[2, 0])
    run = TrainingRun(settings, RunFiles.create(tmp_path, "u"), family="SD1.5", alphas_cumprod=_schedule(), prompts=2,
                      parts=parts)
    trainer = run.train(net, eps_fn, data, callbacks=[Logs()])
    weights = [w for w, _ in trainer.stages[-1].terms]
    kinds = [type(t).__name__ for _, t in trainer.stages[-1].terms]
    assert kinds == ["DMDLoss", "TSCDLoss", "FeedbackLoss"] and weights == [1.0, 1.0, 0.5]
    fb_term = trainer.stages[-1].terms[-1][1]
    assert fb_term.grid == [999] and fb_term.eta == 1.0
    assert "reward_tiny" in logs[-1] and logs[-1]["feedback_t"] == 999
    assert trainer.signature["score_feedback_weight"] == 0.5
    run2 = TrainingRun(settings, RunFiles.create(tmp_path, "v"), family="SD1.5", alphas_cumprod=_schedule(), prompts=2)
    with pytest.raises(ValueError, match="score_feedback_weight needs rewards"):
        run2.train(TinyEps(), eps_fn, data)


def test_a_finished_feedback_run_queued_with_another_ratio_merges_again(tmp_path):
    from safetensors import safe_open

    run, trainer, base = _feedback_run(tmp_path, steps_per_stage=2)
    with safe_open(str(run.files.feedback_lora), framework="pt") as f:
        own = {k: f.get_tensor(k) for k in f.keys()}
    run2, trainer2, _ = _feedback_run(tmp_path, steps_per_stage=2, merge_ratio=0.25)
    assert trainer2.step == 2 and trainer2.history == trainer.history  # nothing trained again
    with safe_open(str(run2.files.lora), framework="pt") as f:
        merged, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    assert meta["hypersd.feedback_ratio"] == "0.25"
    pre = next(k for k in own if k.endswith(".lora_down.weight"))[: -len(".lora_down.weight")]
    torch.testing.assert_close(lora_merge.delta(merged, pre), lora_merge.delta(own, pre, 0.25))


def test_keep_on_brings_back_a_module_the_host_moved_or_built_under_inference_mode():
    """A reward or VAE that the host offloads or moves under inference mode (ComfyUI does both; on
    a GPU the feedback run then failed) is put back where it is used, its tensors usable by autograd;
    when all is in place it only looks."""
    from ComfyUI_HyperSD.hypersd_core import lora_train

    with torch.inference_mode():
        m = torch.nn.Linear(3, 2)
    with torch.inference_mode(False):
        m.to(torch.float64).to(torch.float32)  # what a move to another device does to each parameter
    x = torch.ones(1, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="version counter"):
        m(x).sum().backward()
    assert lora_train.keep_on(m, "cpu") is True
    m(x).sum().backward()
    assert x.grad is not None and not m.weight.requires_grad
    assert lora_train.keep_on(m, "cpu") is False


def test_each_step_count_of_a_feedback_run_can_have_its_own_eta(tmp_path):
    """``feedback_eta_by_steps`` (the node's ``eta_of_lora``: a unified LoRA's own table) gives each
    stage its sampler eta, ``feedback_eta`` the step counts it does not list; it is part of the resume
    signature only when set (earlier states resume) and written into the files; a bad table is refused."""
    from safetensors import safe_open

    from ComfyUI_HyperSD.hypersd_core.pipeline import feedback_stages

    settings = TrainSettings(method="feedback", stages="1,2,4", feedback_eta=1.0, feedback_eta_by_steps="2:0.3,4:0.6")
    _, _, adapters, reward, _, eps_fn, ab, data = _setup()
    parts = FeedbackParts(decode=Decoder(), rewards=[feedback.RewardTerm(reward)], prompt_labels=[2, 0])
    stages = feedback_stages(settings, eps_fn, adapters, ab, data, parts)
    assert [s.terms[0][1].eta for s in stages] == [1.0, 0.3, 0.6]
    assert settings.signature()["feedback_eta_by_steps"] == "2:0.3,4:0.6"
    assert "feedback_eta_by_steps" not in TrainSettings(method="feedback", stages="2").signature()
    assert TrainSettings(method="feedback", stages="2", feedback_eta_by_steps=[[2, 0.3]]).eta_of_stage(2) == 0.3
    for bad in ("2=0.3", "2:1.5", ((2, 1.5),), "0:0.3"):
        with pytest.raises(ValueError, match="eta"):
            TrainSettings(method="feedback", stages="2", feedback_eta_by_steps=bad)
    run, _, _ = _feedback_run(tmp_path, steps_per_stage=1, feedback_eta_by_steps="2:0.3")
    for path in (run.files.lora, run.files.feedback_lora):
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata()["hypersd.feedback_eta_by_steps"] == "2:0.3"
