"""TSCD core in plain torch: grid and segment math by hand, adapters, the loop, resume."""
from __future__ import annotations

import math

import pytest
import torch

from ComfyUI_HyperSD.hypersd_core import lora_train, metadata, schedules, train, tscd
from ComfyUI_HyperSD.hypersd_core.data import LatentData
from hypersd_dev.tiny_tscd import TinyEps, setup as _setup  # noqa: F401  (TinyEps: test_dmd_core imports it here)


# ---------------------------------------------------------------------- math by hand


def test_solver_grid_is_50_ddim_steps_with_skip_20():
    g = tscd.solver_timesteps(50, 1000)
    assert len(g) == 50
    assert g[:3].tolist() == [19, 39, 59]
    assert g[-2:].tolist() == [979, 999]
    assert tscd.solver_timesteps(4, 1000).tolist() == [249, 499, 749, 999]


@pytest.mark.parametrize("t,k,edge", [
    (999, 8, 875), (139, 8, 125), (119, 8, 0), (500, 8, 500), (874, 8, 750),
    (999, 4, 750), (259, 4, 250), (249, 4, 0), (999, 2, 500), (499, 2, 0),
    (999, 1, 0), (19, 1, 0), (999, 3, 999), (998, 3, 666), (665, 3, 333),
])
def test_segment_edge_by_hand(t, k, edge):
    assert tscd.segment_edge(t, k) == edge
    assert tscd.segment_edge(torch.tensor([t]), k).tolist() == [edge]


def test_target_times_by_hand():
    u = torch.tensor([0.0, 0.5, 0.999999], dtype=torch.float64)
    # t_n = 999, k = 4: t_prev = 979, t_b = 750, integers in [750, 979] (230 of them).
    t_prev, t_end = tscd.target_timesteps(torch.tensor([999, 999, 999]), 4, u, skip=20)
    assert t_prev.tolist() == [979, 979, 979]
    assert t_end.tolist() == [750, 750 + math.floor(0.5 * 230), 979]
    # The teacher's step would cross the edge: it stops at the edge, and so does t_end.
    t_prev, t_end = tscd.target_timesteps(torch.tensor([259, 139, 19]), 4, u, skip=20)
    assert t_prev.tolist() == [250, 119, 0]
    assert t_end.tolist() == [250, 0 + math.floor(0.5 * 120), 0]
    t_prev, t_end = tscd.target_timesteps(torch.tensor([139]), 8, torch.tensor([0.7], dtype=torch.float64), skip=20)
    assert (t_prev.item(), t_end.item()) == (125, 125)
    # k = 1: the whole range is one segment, t_end anywhere in [0, t_prev].
    t_prev, t_end = tscd.target_timesteps(torch.tensor([519]), 1, torch.tensor([0.25], dtype=torch.float64), skip=20)
    assert (t_prev.item(), t_end.item()) == (499, math.floor(0.25 * 500))


def test_targets_never_leave_their_segment():
    gen = torch.Generator().manual_seed(0)
    grid = tscd.solver_timesteps()
    for k in (8, 4, 2, 1, 3, 5):
        t_n = grid[torch.randint(0, 50, (4000,), generator=gen)]
        u = torch.rand(4000, generator=gen, dtype=torch.float64)
        t_prev, t_end = tscd.target_timesteps(t_n, k, u, skip=20)
        t_b = tscd.segment_edge(t_n, k)
        assert bool((t_end >= t_b).all()) and bool((t_end <= t_prev).all()) and bool((t_prev <= t_n).all())
        assert bool((tscd.segment_edge(t_end, k) == t_b).all())


def test_ddim_jump_is_exact_on_a_true_trajectory():
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, 8, 8, generator=gen)
    eps = torch.randn(3, 4, 8, 8, generator=gen)
    a = torch.linspace(0.9, 0.1, 3)
    b = torch.tensor([0.95, 0.5, 0.99])
    x_t = tscd.add_noise(x0, eps, a)
    torch.testing.assert_close(tscd.ddim_jump(x_t, eps, a, b), tscd.add_noise(x0, eps, b))
    torch.testing.assert_close(tscd.ddim_jump(x_t, eps, a, a), x_t)
    torch.testing.assert_close(tscd.predict_x0(x_t, eps, a), x0, atol=1e-5, rtol=1e-5)


def test_parse_stages():
    """One parser, for the trainer's input and for the files it wrote."""
    assert metadata.parse_stages("8,4,2,1") == [8, 4, 2, 1]
    assert metadata.parse_stages(" 4 2 ") == [4, 2]
    assert metadata.parse_stages("8; 4,2") == [8, 4, 2]
    assert metadata.parse_stages("[8, 4]") == [8, 4]
    assert metadata.parse_stages(2) == [2] and metadata.parse_stages((4, 1)) == [4, 1]
    for bad in ("", "a,b", "0", "4,-1", "2000", "4.5", "[4, 2.5]", "k8,k4", True):
        with pytest.raises(ValueError, match="stage|whole numbers"):
            metadata.parse_stages(bad)


def test_progressive_stages_reset_the_ema_only_when_the_segment_count_changes():
    stages = tscd.progressive_stages([8, 4, 4, 1, 1, 2], 5, lambda k: [])
    assert [(s.segments, s.steps, s.reset_ema) for s in stages] == [
        (8, 5, True), (4, 5, True), (4, 5, False), (1, 5, True), (1, 5, False), (2, 5, True)]


def test_learning_rate_schedules_by_hand():
    assert train.learning_rate_at(1e-3, "constant", 123, 300) == 1e-3
    # cosine over a 300-step stage: 15 warm-up steps (1/15 .. 15/15), then down to a tenth at the last step
    lr = [train.learning_rate_at(1e-3, "cosine", j, 300) for j in range(300)]
    assert lr[0] == pytest.approx(1e-3 / 15) and lr[14] == pytest.approx(1e-3)
    assert lr[15] == pytest.approx(1e-3) and lr[-1] == pytest.approx(1e-4)
    mid = 15 + (299 - 15) / 2  # half-way through the decay: floor + (1 - floor) / 2
    assert train.learning_rate_at(1e-3, "cosine", int(mid), 300) == pytest.approx(1e-3 * 0.55, rel=1e-2)
    assert all(a >= b for a, b in zip(lr[14:], lr[15:]))
    with pytest.raises(ValueError, match="constant, cosine"):
        train.learning_rate_at(1e-3, "linear", 0, 10)


# ---------------------------------------------------------------------- a plain-torch denoiser


def test_adapters_modes_and_detach_restore_the_module():
    net, adapters, trainer, eps_fn = _setup()
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([999, 10])
    c = torch.randn(2, 8)
    with adapters.mode("teacher"):
        base = net(x, t, c).detach()
    torch.testing.assert_close(net(x, t, c), base)  # lora_B starts at zero: student = teacher
    with torch.no_grad():
        for p in adapters.student_parameters():
            p.add_(0.1)
    assert not torch.allclose(net(x, t, c), base)
    with adapters.mode("teacher"):
        torch.testing.assert_close(net(x, t, c), base)
    with adapters.mode("target"):  # EMA still at the initial weights
        torch.testing.assert_close(net(x, t, c), base)
    student = net(x, t, c).detach()
    adapters.ema_update(0.5)  # half-way from the initial weights to the student's
    with adapters.mode("target"):
        half = net(x, t, c).detach()
    assert not torch.allclose(half, base) and not torch.allclose(half, student)
    adapters.ema_update(0.0)  # decay 0: the EMA takes the student's weights
    with adapters.mode("target"):
        torch.testing.assert_close(net(x, t, c), student)
    sd = adapters.kohya_state_dict(lambda n: "lora_unet_" + n.replace(".", "_"))
    assert sd["lora_unet_conv_in.lora_down.weight"].shape == (2, 4, 3, 3)
    assert sd["lora_unet_conv_in.lora_up.weight"].shape == (16, 2, 1, 1)
    assert sd["lora_unet_mid.lora_down.weight"].shape == (2, 16)
    assert float(sd["lora_unet_mid.alpha"]) == 2.0
    adapters.detach()
    assert type(net.conv_in) is torch.nn.Conv2d and type(net.mid) is torch.nn.Linear
    assert not any("lora" in n for n, _ in net.named_parameters())
    torch.testing.assert_close(net(x, t, c), base)


def test_student_init_is_seeded_and_independent_of_global_rng():
    _, a1, _, _ = _setup(seed=3)
    torch.manual_seed(999)
    torch.rand(10)
    _, a2, _, _ = _setup(seed=3)
    for p, q in zip(a1.student_parameters(), a2.student_parameters()):
        torch.testing.assert_close(p, q)


def test_resume_from_state_continues_exactly():
    _, a_full, t_full, _ = _setup(steps=3)
    t_full.run()

    class StopAt(train.Callback):
        def on_step_start(self, trainer):
            if trainer.step == 4:
                raise KeyboardInterrupt

    _, _, t_part, _ = _setup(steps=3, callbacks=[StopAt()])
    with pytest.raises(KeyboardInterrupt):
        t_part.run()
    assert t_part.step == 4
    state = t_part.state_dict()
    assert state["optimizer"]["state"][0]["step"].item() == 4
    _, a_res, t_res, _ = _setup(steps=3)
    t_res.load_state_dict(state)
    assert t_res.step == 4
    t_res.run()
    assert t_res.step == t_full.step == 6
    for p, q in zip(a_full.student_parameters(), a_res.student_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert t_res.history == pytest.approx(t_full.history, rel=0, abs=0)


def test_resume_refuses_other_settings():
    _, _, t1, _ = _setup()
    state = t1.state_dict()
    state["signature"] = {"t": 2}
    _, _, t2, _ = _setup()
    with pytest.raises(ValueError, match="different settings"):
        t2.load_state_dict(state)


def test_nan_stops_with_a_clear_error():
    class Poison(train.Callback):
        def on_step_end(self, trainer, loss, logs):
            if trainer.step == 2:
                with torch.no_grad():
                    trainer.adapters.student_parameters()[0].fill_(float("nan"))

    _, _, trainer, _ = _setup(callbacks=[Poison()])
    with pytest.raises(train.NonFiniteLossError, match="NaN") as e:
        trainer.run()
    assert e.value.step == 2


def test_loss_term_plugs_in_beside_tscd():
    """A stage can carry several weighted terms: later reward/score losses plug in the same way."""
    calls = []

    class Extra:
        def __init__(self, adapters, eps_fn):
            self.adapters, self.eps_fn = adapters, eps_fn

        def __call__(self, batch, stage, generator):
            self.adapters.set_mode("student")
            t = torch.full((batch.x0.shape[0],), 500)
            out = self.eps_fn(batch.x0, t, 1.0, batch.cond)
            calls.append(stage.segments)
            return out.pow(2).mean(), {"extra": 1.0}

    net, adapters, trainer, eps_fn = _setup(steps=2)
    for st in trainer.stages:
        st.terms.append((0.5, Extra(adapters, eps_fn)))
    trainer.run()
    assert calls == [2, 2, 1, 1]


def test_stage_grid_trains_every_time_the_k_step_recipe_samples_at():
    """A k-step LoRA is sampled with DDIM trailing (999, 874, 749, ... for k = 8); those times
    sit between solver-grid points, at the top of a segment, so the stage trains at them too."""
    solver = set(tscd.solver_timesteps().tolist())
    for k in (8, 4, 2, 1):
        grid = tscd.stage_timesteps(k).tolist()
        assert grid == sorted(set(grid)) and solver <= set(grid)
        assert set(schedules.trailing_timesteps(k)) <= set(grid)
    assert sorted(set(tscd.stage_timesteps(8).tolist()) - solver) == [124, 249, 374, 624, 749, 874]
    assert sorted(set(tscd.stage_timesteps(4).tolist()) - solver) == [249, 749]
    # the loss draws them: at 874 (in segment [750, 875)) the teacher steps to 854, the target lands in [750, 854]
    loss = tscd.TSCDLoss(lambda x, t, cfg, cond: x, None, torch.linspace(0.999, 0.01, 1000))
    t_n, t_prev, t_end = loss.sample_times(4000, 8, torch.Generator().manual_seed(0))
    at = t_n == 874
    assert 30 < int(at.sum()) < 120  # about 4000 / 56
    assert set(t_prev[at].tolist()) == {854} and int(t_end[at].min()) >= 750 and int(t_end[at].max()) <= 854


def test_two_processes_equal_one_with_the_doubled_batch(tmp_path):
    """Data parallel over ``torch.distributed`` (gloo, 2 processes, batch 3 each) ends with the same
    LoRA and losses as one process with batch 6 and the same data order; both processes agree."""
    import torch.multiprocessing as mp

    from hypersd_dev import tiny_tscd

    mp.spawn(tiny_tscd.data_parallel_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    _, adapters, trainer, _ = _setup(stages=(2, 1), steps=2, batch_size=6)
    trainer.run()
    single = adapters.weights(lora_train.STUDENT)
    assert set(ranks[0]["weights"]) == set(single)
    for k in single:
        assert torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k]), k
        torch.testing.assert_close(ranks[0]["weights"][k], single[k], rtol=1e-4, atol=1e-6)
    assert ranks[0]["history"] == pytest.approx(trainer.history, rel=1e-5)
    assert any(not torch.equal(single[k], _setup()[1].weights(lora_train.STUDENT)[k]) for k in single)  # it trained


def test_score_distillation_and_feedback_split_over_two_processes_as_one(tmp_path):
    """The score stage's terms in data parallel (gloo, 2 processes, batch 3 each): distribution
    matching with its fake score (whose own gradients are averaged too) and regression bank, the
    TSCD term, feedback with the structure term; the LoRA, the fake score and the losses equal one
    process with batch 6."""
    import torch.multiprocessing as mp

    from hypersd_dev import tiny_tscd

    mp.spawn(tiny_tscd.data_parallel_worker, args=(2, str(tmp_path / "init"), str(tmp_path), True), nprocs=2,
             join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    _, adapters, trainer, _ = tiny_tscd.setup(stages=(2, 1), steps=2, batch_size=6, score=True)
    trainer.run()
    assert trainer.stages[-1].name == "score" and len(trainer.history) == 6
    for name, single in (("weights", adapters.weights(lora_train.STUDENT)), ("fake", adapters.weights(lora_train.FAKE))):
        assert set(ranks[0][name]) == set(single) and single
        for k in single:
            assert torch.equal(ranks[0][name][k], ranks[1][name][k]), k
            torch.testing.assert_close(ranks[0][name][k], single[k], rtol=1e-4, atol=1e-6)
    assert ranks[0]["history"] == pytest.approx(trainer.history, rel=1e-4)
    untrained = tiny_tscd.setup(score=True)[1].weights(lora_train.FAKE)
    assert any(not torch.equal(single[k], untrained[k]) for k in single)  # the fake score trained


def test_a_terms_own_nan_check_stops_every_process_through_the_average():
    """Data parallel: a term that raises its own NonFiniteLossError (a part it backpropagated early)
    does not leave the other processes waiting in the gradient average: this process still joins
    the average, which stops all of them, and raises the term's own error (here one process stands
    for two: its sums are doubled)."""
    class Poisoned:
        data_parallel = True

        def __call__(self, batch, stage, gen):
            raise train.NonFiniteLossError(batch.step, stage, "regression loss")

    _, adapters, _, _ = _setup()
    data = LatentData([(torch.randn(6, 4, 8, 8), torch.randn(1, 8))])
    reduced = []

    def all_reduce(t):
        reduced.append(t.clone())
        t.mul_(2)

    stages = [train.Stage(segments=1, steps=1, terms=[(1.0, Poisoned())])]
    trainer = train.Trainer(adapters, stages, data, lr=1e-3, batch_size=3, seed=0, shard=(0, 2), all_reduce=all_reduce)
    with pytest.raises(train.NonFiniteLossError, match="regression loss"):
        trainer.run()
    assert len(reduced) == 1 and reduced[0][0] == 1.0  # it joined the average, flagged


def test_terms_that_draw_per_process_refuse_to_be_split():
    class Local:
        def __call__(self, batch, stage, gen):
            return batch.x0.mean(), {}

    net, adapters, _, _ = _setup()
    data = LatentData([(torch.randn(6, 4, 8, 8), torch.randn(1, 8))])
    stages = [train.Stage(segments=1, steps=1, terms=[(1.0, Local())])]
    with pytest.raises(ValueError, match="Local cannot be split over processes"):
        train.Trainer(adapters, stages, data, lr=1e-3, batch_size=3, seed=0, shard=(0, 2), all_reduce=lambda t: None)
