"""Score distillation core (hypersd_core.dmd) in plain torch: the fake-score adapter, the
distribution-matching gradient by hand, the regression bank, a run, exact resume."""
from __future__ import annotations

import pytest
import torch

from ComfyUI_HyperSD.hypersd_core import dmd, lora_train, train, tscd
from ComfyUI_HyperSD.hypersd_core.data import LatentData
from test_tscd_core import TinyEps


def _setup(seed=0, steps=4, teacher_cfg=2.0, fake_updates=2, regression_weight=0.25, callbacks=(), lr=1e-3):
    torch.manual_seed(1234)
    net = TinyEps()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    ab = torch.cumprod(1 - betas, 0)
    uncond = torch.zeros(1, 8)

    def eps_fn(x, t, cfg, cond):
        e = net(x, t, cond.expand(x.shape[0], -1))
        if cfg == 1.0:
            return e
        eu = net(x, t, uncond.expand(x.shape[0], -1))
        return eu + cfg * (e - eu)

    adapters = lora_train.LoraAdapters(net, lora_train.select_targets(net, "all"), rank=2, seed=seed, fake=True)
    gen = torch.Generator().manual_seed(5)
    data = LatentData([(torch.randn(6, 4, 8, 8, generator=gen), torch.randn(1, 8, generator=gen))])
    bank = dmd.RegressionBank.build(eps_fn, adapters, ab, data, batches=2, batch_size=3, teacher_cfg=teacher_cfg,
                                    ode_steps=4, seed=seed) if regression_weight > 0 else None
    term = dmd.DMDLoss(eps_fn, adapters, ab, teacher_cfg=teacher_cfg, fake_updates=fake_updates,
                       fake_lr=1e-3, regression_weight=regression_weight, bank=bank)
    stage = train.Stage(segments=1, steps=steps, terms=[(1.0, term)], name="dmd", reset_ema=False)
    trainer = train.Trainer(adapters, [stage], data, lr=lr, batch_size=3, seed=seed, callbacks=list(callbacks),
                            signature={"t": 1})
    return net, adapters, term, trainer, eps_fn, ab, data


def test_fake_adapter_starts_as_the_teacher_and_trains_alone():
    net, adapters, term, _, eps_fn, _, _ = _setup()
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([500, 700])
    c = torch.randn(1, 8)
    with torch.no_grad(), adapters.mode("teacher"):
        teacher = eps_fn(x, t, 1.0, c)
    with torch.no_grad(), adapters.mode("fake"):
        fake = eps_fn(x, t, 1.0, c)
    torch.testing.assert_close(fake, teacher, rtol=0, atol=0)  # B = 0: a no-op at the start
    adapters.set_mode("fake")
    assert all(p.requires_grad for p in adapters.fake_parameters())
    assert not any(p.requires_grad for p in adapters.student_parameters())
    adapters.set_mode("student")
    assert all(p.requires_grad for p in adapters.student_parameters())
    assert not any(p.requires_grad for p in adapters.fake_parameters())
    plain = lora_train.LoraAdapters(TinyEps(), ["conv_in"], rank=2)
    with pytest.raises(ValueError, match="fake=True"):
        plain.set_mode("fake")
    with pytest.raises(ValueError, match="fake=True"):
        plain.fake_parameters()


def test_distribution_matching_gradient_by_hand():
    """dL/dx = (x0_fake - x0_real) / mean|x - x0_real| / numel, from the same t and noise."""
    net, adapters, term, _, eps_fn, ab, _ = _setup()
    with torch.no_grad():  # a fake score that differs from the teacher
        for p in adapters.fake_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    c = torch.randn(1, 8)
    x = torch.randn(3, 4, 8, 8, requires_grad=True)
    loss, logs = term.distribution_matching(x, c, torch.Generator().manual_seed(11))
    loss.backward()
    g = torch.Generator().manual_seed(11)
    t = torch.randint(dmd.T_MIN, dmd.T_MAX + 1, (3,), generator=g)
    n = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        a = ab[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x + (1 - a).sqrt() * n
        adapters.set_mode("teacher")
        x0_real = (x_t - (1 - a).sqrt() * eps_fn(x_t, t, 2.0, c)) / a.sqrt()
        adapters.set_mode("fake")
        x0_fake = (x_t - (1 - a).sqrt() * eps_fn(x_t, t, 1.0, c)) / a.sqrt()
        expected = (x0_fake - x0_real) / (x - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    adapters.set_mode("student")
    assert float(expected.abs().max()) > 1e-3  # the fake differs from the teacher, so the test can fail
    torch.testing.assert_close(x.grad * x.numel(), expected, rtol=1e-4, atol=1e-6)


def test_no_gradient_when_fake_equals_real():
    """At the start the fake score is the teacher: with the teacher at cfg 1 the two x0 agree."""
    _, _, term, _, _, _, _ = _setup(teacher_cfg=1.0)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    loss, _ = term.distribution_matching(x, torch.randn(1, 8), torch.Generator().manual_seed(3))
    assert float(loss.detach()) == 0.0


def test_regression_bank_is_the_teachers_ode():
    """One ODE step from t = 999 is the teacher's x0 prediction at cfg, by hand."""
    net, adapters, _, _, eps_fn, ab, data = _setup()
    bank = dmd.RegressionBank.build(eps_fn, adapters, ab, data, batches=1, batch_size=2, teacher_cfg=2.0,
                                    ode_steps=1, seed=7)
    e = bank.entry(0)
    with torch.no_grad(), adapters.mode("teacher"):
        eps = eps_fn(e.noise, torch.full((2,), 999), 2.0, e.cond)
    a = ab[999]
    torch.testing.assert_close(e.target, (e.noise - (1 - a).sqrt() * eps) / a.sqrt(), rtol=1e-5, atol=1e-5)
    assert dmd.trailing_grid(4) == [999, 749, 499, 249]
    again = dmd.RegressionBank.build(eps_fn, adapters, ab, data, batches=1, batch_size=2, teacher_cfg=2.0,
                                     ode_steps=1, seed=7)
    torch.testing.assert_close(again.entry(0).noise, e.noise, rtol=0, atol=0)  # seeded


def test_a_dmd_stage_trains_generator_and_fake_score():
    _, adapters, term, trainer, _, _, _ = _setup(steps=3, fake_updates=2)
    s0 = [p.detach().clone() for p in adapters.student_parameters()]
    f0 = [p.detach().clone() for p in adapters.fake_parameters()]
    logs = []

    class Keep(train.Callback):
        def on_step_end(self, trainer, loss, l):
            logs.append(l)

    trainer.callbacks.append(Keep())
    trainer.run()
    assert trainer.step == 3
    assert any(not torch.equal(a, b) for a, b in zip(s0, adapters.student_parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(f0, adapters.fake_parameters()))
    assert term.fake_optimizer.state_dict()["state"][0]["step"].item() == 3 * 2  # fake updates per step
    assert all({"fake_loss", "dmd_loss", "regression_loss"} <= set(l) for l in logs)


def test_regression_pulls_the_generator_to_the_teacher():
    """The generator's one-step output moves towards the teacher's ODE outputs of the bank."""
    _, adapters, term, trainer, _, _, _ = _setup(steps=30, regression_weight=50.0, fake_updates=1, lr=3e-3)

    def reg_error():
        with torch.no_grad():
            return sum(float(torch.nn.functional.mse_loss(term.generate(e.noise, e.cond), e.target))
                       for e in term.bank.entries)

    before = reg_error()
    trainer.run()
    after = reg_error()
    assert after < 0.8 * before, (before, after)


def test_resume_continues_exactly_with_fake_score_and_its_optimizer():
    _, a_full, t_full_term, t_full, _, _, _ = _setup(steps=4)
    t_full.run()

    class StopAt(train.Callback):
        def on_step_start(self, trainer):
            if trainer.step == 2:
                raise KeyboardInterrupt

    _, _, _, t_part, _, _, _ = _setup(steps=4, callbacks=[StopAt()])
    with pytest.raises(KeyboardInterrupt):
        t_part.run()
    state = t_part.state_dict()
    assert set(state["terms"]) == {"0.0"}
    _, a_res, _, t_res, _, _, _ = _setup(steps=4)
    t_res.load_state_dict(state)
    t_res.run()
    for p, q in zip(a_full.student_parameters() + a_full.fake_parameters(),
                    a_res.student_parameters() + a_res.fake_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert t_res.history == pytest.approx(t_full.history, rel=0, abs=0)
    del state["terms"]
    _, _, _, t_bad, _, _, _ = _setup(steps=4)
    with pytest.raises(ValueError, match="no state for loss term"):
        t_bad.load_state_dict(state)


def test_nan_in_the_fake_score_stops_with_a_clear_error():
    _, adapters, _, trainer, _, _, _ = _setup(steps=3)
    with torch.no_grad():
        adapters.fake_parameters()[0].fill_(float("nan"))
    with pytest.raises(train.NonFiniteLossError, match="fake score"):
        trainer.run()


@pytest.mark.parametrize("kw,msg", [
    ({"generator_t": 1000}, "999 for a unified"), ({"generator_t": 0}, "999 for a unified"),
    ({"fake_updates": 0}, "DMD2: 10"), ({"regression_weight": -1.0}, "0 or more"),
    ({"regression_weight": 0.5}, "regression bank"),
])
def test_settings_are_checked_with_advice(kw, msg):
    _, adapters, _, _, eps_fn, ab, _ = _setup(regression_weight=0)
    with pytest.raises(ValueError, match=msg):
        dmd.DMDLoss(eps_fn, adapters, ab, teacher_cfg=2.0, **kw)


def test_generator_gradient_survives_the_adapter_switches():
    """Between the generator's forward (student adapter) and the backward, the term runs the
    teacher (adapters off) and the fake adapter. The student's gradient must still be the full
    chain rule through the generator: recomputed here from dL/dx on a fresh forward."""
    _, adapters, term, _, _, _, data = _setup(regression_weight=0, fake_updates=1)
    with torch.no_grad():  # a student that is not a no-op, so every LoRA factor gets a gradient
        for p in adapters.student_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + 1)))
    seen = {}
    generate = term.generate

    def spy_generate(z, cond):
        x = generate(z, cond)
        if x.requires_grad:  # the generator step (not the no-grad sample for the fake score)
            seen["z"], seen["cond"] = z.clone(), cond
            x.register_hook(lambda g: seen.__setitem__("dx", g.clone()))
        return x

    term.generate = spy_generate
    x0, cond = data.sample(3, torch.Generator().manual_seed(1), torch.device("cpu"))
    adapters.set_mode("student")
    params = adapters.student_parameters()
    for p in params:
        p.grad = None
    loss, _ = term(train.Batch(x0=x0, cond=cond, step=0), None, torch.Generator().manual_seed(2))
    loss.backward()
    assert float(seen["dx"].abs().max()) > 0  # the distribution-matching gradient reached x
    got = [p.grad for p in params]
    assert all(g is not None for g in got), "the student lost its gradient across the mode switches"
    x = generate(seen["z"], seen["cond"])
    want = torch.autograd.grad(x, params, grad_outputs=seen["dx"])
    assert sum(float(w.abs().sum()) for w in want) > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-8)


def test_regression_is_backpropagated_early_with_the_terms_weight():
    """The regression part's gradient is in the student's .grad when the term returns (its
    activations already freed), scaled by the stage's weight of the term; the value returned
    still includes it, and the trainer's backward of the rest adds to it."""
    _, adapters, term, _, _, _, data = _setup(regression_weight=0.5, fake_updates=1)
    x0, cond = data.sample(3, torch.Generator().manual_seed(1), torch.device("cpu"))
    adapters.set_mode("student")
    params = adapters.student_parameters()
    batch = train.Batch(x0=x0, cond=cond, step=1)
    batch.backward_scale = 0.25
    loss, logs = term(batch, None, torch.Generator().manual_seed(2))
    early = [p.grad.clone() for p in params]
    e = term.bank.entry(1)
    reg = torch.nn.functional.mse_loss(term.generate(e.noise, e.cond), e.target)
    want = torch.autograd.grad(0.25 * 0.5 * reg, params)
    for g, w in zip(early, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-9)
    assert logs["regression_loss"] == pytest.approx(float(reg.detach()), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(logs["dmd_loss"] + 0.5 * float(reg.detach()), rel=1e-5)
    loss.backward()  # the distribution-matching part adds on top
    assert any(not torch.allclose(p.grad, g) for p, g in zip(params, early))


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_score_stage_keeps_the_tscd_term_at_its_weight(weight):
    """pipeline.tscd_stages with score_steps: the score stage holds the distribution-matching term and,
    at score_tscd_weight > 0, the one-segment TSCD term at that weight; a step of it runs both (their
    logs) and trains the student."""
    from ComfyUI_HyperSD.hypersd_core.pipeline import TrainSettings, tscd_stages

    net, adapters, _, _, eps_fn, ab, data = _setup()
    settings = TrainSettings(stages="2", steps_per_stage=1, score_steps=2, fake_updates=1, regression_weight=0.25,
                             score_tscd_weight=weight, teacher_cfg=2.0, batch_size=3)
    stages = tscd_stages(settings, eps_fn, adapters, ab, data)
    assert [(s.name, s.segments, s.steps) for s in stages][-1] == ("score", 1, 2)
    kinds = [(w, type(t).__name__) for w, t in stages[-1].terms]
    assert kinds == [(1.0, "DMDLoss")] + ([(0.5, "TSCDLoss")] if weight else [])
    logs = []

    class Keep(train.Callback):
        def on_step_end(self, trainer, loss, step_logs):
            logs.append(dict(step_logs))

    before = [p.detach().clone() for p in adapters.student_parameters()]
    train.Trainer(adapters, stages[-1:], data, lr=1e-3, batch_size=3, seed=0, callbacks=[Keep()],
                  signature={"t": 1}).run()
    assert all("dmd_grad_norm" in x for x in logs)
    assert all(("t_n_mean" in x) == bool(weight) for x in logs)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, adapters.student_parameters()))


def _tiny_run(folder, resume, callbacks=(), **score):
    """A pipeline run (TSCD stages 2,1 x 2 steps, then ``score`` settings) of TinyEps in ``folder``."""
    from ComfyUI_HyperSD.hypersd_core.pipeline import RunFiles, TrainingRun, TrainSettings

    torch.manual_seed(1234)
    net = TinyEps()
    ab = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)
    uncond = torch.zeros(1, 8)

    def eps_fn(x, t, cfg, cond):
        e = net(x, t, cond.expand(x.shape[0], -1))
        return e if cfg == 1.0 else (lambda eu: eu + cfg * (e - eu))(net(x, t, uncond.expand(x.shape[0], -1)))

    gen = torch.Generator().manual_seed(5)
    data = LatentData([(torch.randn(6, 4, 8, 8, generator=gen), torch.randn(1, 8, generator=gen))])
    settings = TrainSettings(**{**dict(stages="2,1", steps_per_stage=2, learning_rate=1e-3, rank=2, teacher_cfg=2.0,
                                       batch_size=3, lora_scope="all", checkpoint_every=0), **score})
    run = TrainingRun(settings, RunFiles.create(folder, "tiny"), family="SD1.5", alphas_cumprod=ab, resume=resume)
    return run, run.train(net, eps_fn, data, callbacks=callbacks)


def test_score_distillation_continues_a_finished_tscd_run(tmp_path):
    """A finished TSCD run, queued again with score_steps > 0 and resume on, continues from its state:
    same weights as one uninterrupted TSCD + score run, the TSCD result kept as the last stage's file,
    the final file rewritten as unified. Inside the score stage the score settings are fixed again."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ComfyUI_HyperSD.hypersd_core import pipeline

    assert set(pipeline.TrainSettings(score_steps=1, score_feedback_weight=1.0, feedback_rewards="r:0:1")
               ._score_settings()) == set(pipeline.SCORE_SETTINGS)
    score = dict(score_steps=2, fake_updates=2, regression_weight=0.25)
    cont, straight = tmp_path / "continued", tmp_path / "straight"
    _, tscd_only = _tiny_run(cont, resume=False)
    tscd_lora = load_file(str(cont / "tiny.safetensors"))
    assert not (cont / "tiny_stage2_k1.safetensors").exists()  # the last stage's result is the final file
    run_c, t_c = _tiny_run(cont, resume=True, **score)
    assert t_c.step == 6 and t_c.history[:4] == tscd_only.history
    kept = load_file(str(cont / "tiny_stage2_k1.safetensors"))
    assert all(torch.equal(kept[k], tscd_lora[k]) for k in tscd_lora) and set(kept) == set(tscd_lora)
    run_s, t_s = _tiny_run(straight, resume=False, **score)
    assert t_c.history == pytest.approx(t_s.history, rel=0, abs=0)
    for k, v in run_s.lora.items():
        assert torch.equal(run_c.lora[k], v), k
    assert torch.equal(load_file(str(straight / "tiny_stage2_k1.safetensors"))[next(iter(kept))], next(iter(kept.values())))
    with safe_open(str(cont / "tiny.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["hypersd.score_steps"], meta["hypersd.recommended_sampler"], meta["hypersd.step"]) == ("2", "tcd", "6")

    class StopAt(train.Callback):
        def on_step_start(self, trainer):
            if trainer.step == 5:
                raise KeyboardInterrupt

    inside = tmp_path / "inside"
    with pytest.raises(KeyboardInterrupt):
        _tiny_run(inside, resume=False, callbacks=[StopAt()], **score)
    with pytest.raises(ValueError, match="score-distillation settings can change only before"):
        _tiny_run(inside, resume=True, score_steps=2, fake_updates=3, regression_weight=0.25)
    with pytest.raises(ValueError, match="learning_rate"):  # a TSCD setting never changes on resume
        _tiny_run(cont, resume=True, score_steps=2, fake_updates=2, regression_weight=0.25, learning_rate=2e-3)
