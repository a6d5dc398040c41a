"""Trajectory Segmented Consistency Distillation (Hyper-SD, part 1), in plain torch.

The denoiser is any callable ``eps_fn(x_t, t, cfg, cond) -> eps``: ``x_t`` in variance-
preserving space (``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``), ``t`` integer timesteps of
shape ``(B,)``, ``cfg`` the classifier-free guidance scale to apply (1 = conditional only)
and ``cond`` whatever the batch carries. Which weights answer (student, EMA target,
teacher) is switched by an adapter object with ``set_mode(...)``
(:class:`hypersd_core.lora_train.LoraAdapters`).

One TSCD step (Algorithm 1 of the paper, as reconstructed):

* ``t_n`` on the stage's grid: the solver grid (``solver_steps`` DDIM steps over ``T``: 19,
  39, ..., 999 for 50 over 1000; skip ``s = T // solver_steps``) together with the times the
  k-step recipe samples at (DDIM trailing: 999, 874, 749, ... for k = 8, most of which fall
  between solver-grid points, right at a segment's top, where the network would otherwise
  interpolate between two segments' jumps; :func:`stage_timesteps`), ``t_{n-1} = t_n - s``
  (0 at the bottom);
* the segment edge ``t_b = floor(t_n / floor(T/k)) * floor(T/k)`` for ``k`` segments;
* the target time ``t_end`` uniform on the integers of ``[t_b, max(t_{n-1}, t_b)]``; when
  the teacher's step would cross the edge (``t_{n-1} < t_b``) it stops at the edge instead,
  so no jump ever leaves its segment (and ``t_end = t_b`` is then the boundary condition);
* ``x_{t_n}`` = noised data; the teacher (adapters off) takes one DDIM step with CFG to
  ``t_{n-1}``; the student jumps ``x_{t_n} -> t_end`` with its own prediction; the EMA
  target jumps the teacher's ``x_{t_{n-1}} -> t_end``; the loss is the distance (pseudo-
  Huber or MSE) between the two.

A TSCD run is a list of :class:`~.train.Stage` (progressive: k = 8, 4, 2, 1, each continuing
from the previous weights, :func:`progressive_stages`), run by :class:`~.train.Trainer`
inside a :class:`~.pipeline.TrainingRun`. A stage holds weighted loss terms, so later
methods (reward feedback, score distillation) plug in as further terms or stages.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from .metadata import NUM_TRAIN_TIMESTEPS
from .schedules import segment_edge, segment_timesteps  # t_b and the k-step sampling grid
from .train import Batch, Stage

SOLVER_STEPS = 50
LOSSES = ("huber", "mse")

EpsFn = Callable[[torch.Tensor, torch.Tensor, float, Any], torch.Tensor]


# ---------------------------------------------------------------------- grids


def solver_timesteps(solver_steps: int = SOLVER_STEPS, T: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The DDIM solver grid: ``[s-1, 2s-1, ..., T-1]`` with ``s = T // solver_steps``."""
    if not 1 <= solver_steps <= T:
        raise ValueError(f"solver_steps must be in [1, {T}], got {solver_steps}")
    s = T // solver_steps
    return torch.arange(1, solver_steps + 1, dtype=torch.long) * s - 1


def stage_timesteps(segments: int, solver_steps: int = SOLVER_STEPS, T: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The ``t_n`` a stage with ``segments`` (k) trains at: the solver grid and the k-step
    trailing grid (:func:`~.schedules.segment_timesteps`, the times a k-step LoRA is sampled
    at), each once, ascending. Over 50 solver steps of 1000 this adds 124, 249, 374, 624, 749
    and 874 for k = 8, 249 and 749 for k = 4, and nothing for k = 2 and 1 (their trailing
    times are on the solver grid)."""
    grid = set(solver_timesteps(solver_steps, T).tolist()) | set(segment_timesteps(segments, T))
    return torch.tensor(sorted(grid), dtype=torch.long)


def target_timesteps(t_n: torch.Tensor, k: int, u: torch.Tensor, skip: int,
                     T: int = NUM_TRAIN_TIMESTEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t_prev, t_end)`` for solver times ``t_n`` and uniforms ``u`` in [0, 1).

    ``t_prev = max(t_n - skip, 0, t_b)`` (the teacher's step, stopped at the segment edge
    ``t_b``) and ``t_end = t_b + floor(u * (t_prev - t_b + 1))``, an integer uniform on
    ``[t_b, t_prev]``.
    """
    t_n = t_n.long()
    t_b = segment_edge(t_n, k, T)
    t_prev = torch.maximum((t_n - skip).clamp(min=0), t_b)
    span = (t_prev - t_b + 1).to(u.dtype)
    t_end = t_b + torch.floor(u * span).long().clamp(max=(t_prev - t_b))
    return t_prev, t_end


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.device, x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    a = _bcast(a_t, x_t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def ddim_jump(x_t: torch.Tensor, eps: torch.Tensor, a_from: torch.Tensor, a_to: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM move from alpha-bar ``a_from`` to ``a_to`` along ``eps``."""
    x0 = predict_x0(x_t, eps, a_from)
    b = _bcast(a_to, x_t)
    return b.sqrt() * x0 + (1 - b).sqrt() * eps


def add_noise(x0: torch.Tensor, noise: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    a = _bcast(a_t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float = 1e-3) -> torch.Tensor:
    d = (pred.float() - target.float()) ** 2
    return (torch.sqrt(d + c * c) - c).mean()


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(pred.float(), target.float())


# ---------------------------------------------------------------------- batches and losses


class ModeSwitch(Protocol):
    def set_mode(self, mode: str) -> None: ...


def check_loss(loss: str) -> None:
    """Refuse a distance other than :data:`LOSSES`, saying which there are."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}: use 'huber' or 'mse'")


class TSCDLoss:
    """The TSCD objective for the stage's ``segments`` (k).

    ``alphas_cumprod``: the T alpha-bars of the teacher's schedule. ``teacher_cfg``: the
    guidance scale baked into the student (the student and target run at cfg 1).
    """

    def __init__(self, eps_fn: EpsFn, adapters: ModeSwitch, alphas_cumprod: torch.Tensor, *,
                 teacher_cfg: float = 7.0, solver_steps: int = SOLVER_STEPS, loss: str = "huber",
                 huber_c: float = 1e-3):
        check_loss(loss)
        self.eps_fn = eps_fn
        self.adapters = adapters
        self.alphas_cumprod = alphas_cumprod.detach().double().float()
        self.T = int(alphas_cumprod.shape[0])
        self.solver_steps = int(solver_steps)
        self.grid = solver_timesteps(solver_steps, self.T)
        self.grids: dict[int, torch.Tensor] = {}  # k -> the stage's t_n grid (stage_timesteps)
        self.skip = self.T // solver_steps
        self.teacher_cfg = float(teacher_cfg)
        self.loss = loss
        self.huber_c = huber_c

    data_parallel = True  # draws its random numbers for the global batch (``Batch.draw_size``)

    def sample_times(self, batch_size: int, k: int, generator: torch.Generator):
        grid = self.grids.setdefault(k, stage_timesteps(k, self.solver_steps, self.T))
        idx = torch.randint(0, len(grid), (batch_size,), generator=generator)
        t_n = grid[idx]
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        t_prev, t_end = target_timesteps(t_n, k, u, self.skip, self.T)
        return t_n, t_prev, t_end

    def __call__(self, batch: Batch, stage: Stage, generator: torch.Generator):
        x0 = batch.x0
        dev = x0.device
        # drawn for the global batch (data parallel: every process draws the same, keeps its rows)
        n = batch.draw_size
        t_n, t_prev, t_end = map(batch.mine, self.sample_times(n, stage.segments, generator))
        noise = batch.mine(torch.randn((n, *x0.shape[1:]), generator=generator, dtype=torch.float32))
        noise = noise.to(dev, x0.dtype)
        ab = self.alphas_cumprod
        a_n, a_prev, a_end = ab[t_n], ab[t_prev], ab[t_end]
        x_n = add_noise(x0, noise, a_n)
        t_n_d, t_prev_d = t_n.to(dev), t_prev.to(dev)
        with torch.no_grad():
            self.adapters.set_mode("teacher")
            eps_t = self.eps_fn(x_n, t_n_d, self.teacher_cfg, batch.cond)
            x_prev = ddim_jump(x_n, eps_t, a_n, a_prev)
            self.adapters.set_mode("target")
            eps_e = self.eps_fn(x_prev, t_prev_d, 1.0, batch.cond)
            target = ddim_jump(x_prev, eps_e, a_prev, a_end)
        self.adapters.set_mode("student")
        eps_s = self.eps_fn(x_n, t_n_d, 1.0, batch.cond)
        pred = ddim_jump(x_n, eps_s, a_n, a_end)
        if self.loss == "huber":
            loss = pseudo_huber(pred, target, self.huber_c)
        else:
            loss = mse(pred, target)
        return loss, {"t_n_mean": float(t_n.float().mean())}


# ---------------------------------------------------------------------- stages


def progressive_stages(segments: Sequence[int], steps_per_stage: int, make_terms: Callable[[int], list]) -> list[Stage]:
    """One TSCD stage per segment count, in order, each with ``make_terms(k)``.

    A stage whose segment count differs from the previous one starts its EMA target from
    the student; a repeated count (``"1,1,1,1"``: one-segment training cut into stages,
    each saved on its own) carries the EMA on, as one long stage would.
    """
    out = []
    for i, k in enumerate(segments):
        out.append(Stage(segments=k, steps=int(steps_per_stage), terms=make_terms(k),
                         reset_ema=(i == 0 or int(segments[i - 1]) != int(k))))
    return out
