"""Trajectory Segmented Consistency Distillation (Hyper-SD, part 1), in plain torch.

The denoiser is any callable ``eps_fn(x_t, t, cfg, cond) -> eps``: ``x_t`` in variance-
preserving space (``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``), ``t`` integer timesteps of
shape ``(B,)``, ``cfg`` the classifier-free guidance scale to apply (1 = conditional only)
and ``cond`` whatever the batch carries. Which weights answer (student, EMA target,
teacher) is switched by an adapter object with ``set_mode(...)``
(:class:`hypersd_core.lora_train.LoraAdapters`).

One TSCD step (Algorithm 1 of the paper, as reconstructed):

* ``t_n`` on the solver grid (``solver_steps`` DDIM steps over ``T``: 19, 39, ..., 999 for
  50 over 1000; skip ``s = T // solver_steps``), ``t_{n-1} = t_n - s`` (0 at the bottom);
* the segment edge ``t_b = floor(t_n / floor(T/k)) * floor(T/k)`` for ``k`` segments;
* the target time ``t_end`` uniform on the integers of ``[t_b, max(t_{n-1}, t_b)]``; when
  the teacher's step would cross the edge (``t_{n-1} < t_b``) it stops at the edge instead,
  so no jump ever leaves its segment (and ``t_end = t_b`` is then the boundary condition);
* ``x_{t_n}`` = noised data; the teacher (adapters off) takes one DDIM step with CFG to
  ``t_{n-1}``; the student jumps ``x_{t_n} -> t_end`` with its own prediction; the EMA
  target jumps the teacher's ``x_{t_{n-1}} -> t_end``; the loss is the distance (pseudo-
  Huber or MSE) between the two.

Training is a list of :class:`Stage` (progressive: k = 8, 4, 2, 1, each continuing from the
previous weights). A stage holds weighted loss terms, so later methods (reward feedback,
score distillation) plug in as further terms or stages with no change to the loop.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .schedules import segment_edge  # t_b, shared with the segments sampling grid

log = logging.getLogger(__name__)

T_TRAIN = 1000
SOLVER_STEPS = 50

EpsFn = Callable[[torch.Tensor, torch.Tensor, float, Any], torch.Tensor]


# ---------------------------------------------------------------------- grids


def solver_timesteps(solver_steps: int = SOLVER_STEPS, T: int = T_TRAIN) -> torch.Tensor:
    """The DDIM solver grid: ``[s-1, 2s-1, ..., T-1]`` with ``s = T // solver_steps``."""
    if not 1 <= solver_steps <= T:
        raise ValueError(f"solver_steps must be in [1, {T}], got {solver_steps}")
    s = T // solver_steps
    return torch.arange(1, solver_steps + 1, dtype=torch.long) * s - 1


def target_timesteps(t_n: torch.Tensor, k: int, u: torch.Tensor, skip: int,
                     T: int = T_TRAIN) -> tuple[torch.Tensor, torch.Tensor]:
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


def parse_stages(text: str | Sequence[int], T: int = T_TRAIN) -> list[int]:
    """``"8,4,2,1"`` -> ``[8, 4, 2, 1]`` (each a segment count in [1, T])."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.replace(";", ",").replace(" ", ",").split(",") if p.strip()]
        try:
            ks = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"stages must be whole numbers separated by commas, like '8,4,2,1'; got {text!r}") from None
    else:
        ks = [int(k) for k in text]
    if not ks:
        raise ValueError("stages is empty: give segment counts such as '8,4,2,1'")
    for k in ks:
        if not 1 <= k <= T:
            raise ValueError(f"a stage's segment count must be between 1 and {T}; got {k}")
    return ks


# ---------------------------------------------------------------------- batches and losses


@dataclass
class Batch:
    x0: torch.Tensor  # clean latents, (B, C, H, W), in the denoiser's latent space
    cond: Any = None  # passed through to eps_fn
    step: int = 0


class ModeSwitch(Protocol):
    def set_mode(self, mode: str) -> None: ...


class LossTerm(Protocol):
    """A loss of one stage: ``term(batch, stage, generator) -> (loss, logs)``."""

    def __call__(self, batch: Batch, stage: "Stage", generator: torch.Generator) -> tuple[torch.Tensor, dict]: ...


class TSCDLoss:
    """The TSCD objective for the stage's ``segments`` (k).

    ``alphas_cumprod``: the T alpha-bars of the teacher's schedule. ``teacher_cfg``: the
    guidance scale baked into the student (the student and target run at cfg 1).
    """

    def __init__(self, eps_fn: EpsFn, adapters: ModeSwitch, alphas_cumprod: torch.Tensor, *,
                 teacher_cfg: float = 7.0, solver_steps: int = SOLVER_STEPS, loss: str = "huber",
                 huber_c: float = 1e-3):
        if loss not in ("huber", "mse"):
            raise ValueError(f"unknown loss {loss!r}: use 'huber' or 'mse'")
        self.eps_fn = eps_fn
        self.adapters = adapters
        self.alphas_cumprod = alphas_cumprod.detach().double().float()
        self.T = int(alphas_cumprod.shape[0])
        self.grid = solver_timesteps(solver_steps, self.T)
        self.skip = self.T // solver_steps
        self.teacher_cfg = float(teacher_cfg)
        self.loss = loss
        self.huber_c = huber_c

    def sample_times(self, batch_size: int, k: int, generator: torch.Generator):
        idx = torch.randint(0, len(self.grid), (batch_size,), generator=generator)
        t_n = self.grid[idx]
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        t_prev, t_end = target_timesteps(t_n, k, u, self.skip, self.T)
        return t_n, t_prev, t_end

    def __call__(self, batch: Batch, stage: "Stage", generator: torch.Generator):
        x0 = batch.x0
        B = x0.shape[0]
        dev = x0.device
        t_n, t_prev, t_end = self.sample_times(B, stage.segments, generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(dev, x0.dtype)
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


# ---------------------------------------------------------------------- stages and data


@dataclass
class Stage:
    """``steps`` optimizer steps with ``segments`` (k) and weighted loss ``terms``."""

    segments: int
    steps: int
    terms: list[tuple[float, LossTerm]] = field(default_factory=list)
    name: str = ""
    reset_ema: bool = True  # start the EMA target from the student when the stage begins

    def __post_init__(self):
        if not self.name:
            self.name = f"tscd-k{self.segments}"


class LatentData:
    """Training latents in groups of equal shape, each with its condition.

    ``sample`` draws a group (in proportion to its size) and a batch from it, with the
    step's generator, so a run is reproducible and resumable from the step number alone.
    """

    def __init__(self, groups: Sequence[tuple[torch.Tensor, Any]]):
        self.groups = [(g, c) for g, c in groups if g.shape[0] > 0]
        if not self.groups:
            raise ValueError("no training latents")
        self.sizes = torch.tensor([g.shape[0] for g, _ in self.groups], dtype=torch.float64)

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def sample(self, batch_size: int, generator: torch.Generator, device, dtype=torch.float32) -> tuple[torch.Tensor, Any]:
        gi = int(torch.multinomial(self.sizes, 1, generator=generator)) if len(self.groups) > 1 else 0
        lat, cond = self.groups[gi]
        n = lat.shape[0]
        if batch_size <= n:
            idx = torch.randperm(n, generator=generator)[:batch_size]
        else:
            idx = torch.randint(0, n, (batch_size,), generator=generator)
        return lat[idx].to(device, dtype), cond


# ---------------------------------------------------------------------- the loop


class NonFiniteLossError(RuntimeError):
    """The loss, the gradients or the weights stopped being finite."""

    def __init__(self, step: int, stage: Stage, what: str, last_good_step: int | None = None):
        self.step, self.stage, self.what, self.last_good_step = step, stage, what, last_good_step
        super().__init__(f"training stopped: the {what} became NaN or infinite at step {step + 1} ({stage.name}); "
                         f"try a lower learning rate or the 'huber' loss")


class Callback:
    """Hooks of :class:`Trainer`. ``on_step_start`` may raise to stop (Cancel)."""

    def on_stage_start(self, trainer: "Trainer", index: int, stage: Stage) -> None: ...
    def on_step_start(self, trainer: "Trainer") -> None: ...
    def on_step_end(self, trainer: "Trainer", loss: float, logs: dict) -> None: ...
    def on_end(self, trainer: "Trainer") -> None: ...


LR_SCHEDULES = ("constant", "cosine")


def learning_rate_at(base: float, schedule: str, step_in_stage: int, stage_steps: int, floor: float = 0.1) -> float:
    """The learning rate of a stage's ``step_in_stage``-th step (0-based).

    ``constant``: ``base``. ``cosine``: a linear warm-up over the first 5% of the stage,
    then ``base * (floor + (1 - floor) * (1 + cos(pi * j / S)) / 2)`` down to ``floor * base``
    at the stage's end, so every stage (and the LoRA saved at its end) finishes at a low rate.
    """
    if schedule == "constant":
        return base
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}: use one of {', '.join(LR_SCHEDULES)}")
    S = max(int(stage_steps), 1)
    warm = max(1, S // 20)
    j = min(max(int(step_in_stage), 0), S - 1)
    if j < warm:
        return base * (j + 1) / warm
    frac = (j - warm) / max(S - 1 - warm, 1)
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac)))


def step_seed(seed: int, step: int) -> int:
    return (int(seed) * 1_000_003 + int(step) * 7_919 + 12_345) % (2**63 - 1)


class Trainer:
    """Runs stages of weighted loss terms on the student adapter with AdamW and an EMA.

    Every random draw of step ``i`` comes from a generator seeded by ``(seed, i)``, so a
    resumed run (``load_state_dict``) continues exactly as an uninterrupted one.
    """

    def __init__(self, adapters, stages: Sequence[Stage], data: LatentData, *, lr: float, batch_size: int,
                 seed: int, device=None, dtype=torch.float32, ema_decay: float = 0.95, grad_clip: float = 1.0,
                 weight_decay: float = 0.0, callbacks: Sequence[Callback] = (), signature: dict | None = None,
                 lr_schedule: str = "constant"):
        self.adapters = adapters
        self.stages = list(stages)
        if not self.stages or any(s.steps < 0 for s in self.stages):
            raise ValueError("stages must be non-empty with non-negative step counts")
        self.data = data
        self.lr = float(lr)
        learning_rate_at(self.lr, lr_schedule, 0, 1)  # validates the name
        self.lr_schedule = lr_schedule
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.device = device if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.ema_decay = float(ema_decay)
        self.grad_clip = float(grad_clip)
        self.callbacks = list(callbacks)
        self.signature = dict(signature or {})
        self.optimizer = torch.optim.AdamW(adapters.student_parameters(), lr=self.lr, weight_decay=weight_decay)
        self.step = 0
        self.last_loss: float | None = None
        self.history: list[float] = []
        self.starts = []
        acc = 0
        for s in self.stages:
            self.starts.append(acc)
            acc += s.steps
        self.total_steps = acc

    def stage_at(self, step: int) -> tuple[int, Stage]:
        for i in range(len(self.stages) - 1, -1, -1):
            if step >= self.starts[i] and self.stages[i].steps > 0:
                return i, self.stages[i]
        return 0, self.stages[0]

    def run(self) -> "Trainer":
        self.adapters.set_mode("student")
        while self.step < self.total_steps:
            step = self.step
            index, stage = self.stage_at(step)
            if step == self.starts[index]:
                if stage.reset_ema:
                    self.adapters.copy_student_to_ema()
                for cb in self.callbacks:
                    cb.on_stage_start(self, index, stage)
            for cb in self.callbacks:
                cb.on_step_start(self)
            loss, logs = self._one_step(step, stage, self.starts[index])
            self.step = step + 1
            self.last_loss = loss
            self.history.append(loss)
            for cb in self.callbacks:
                cb.on_step_end(self, loss, logs)
        for cb in self.callbacks:
            cb.on_end(self)
        return self

    def _one_step(self, step: int, stage: Stage, stage_start: int = 0) -> tuple[float, dict]:
        gen = torch.Generator().manual_seed(step_seed(self.seed, step))
        x0, cond = self.data.sample(self.batch_size, gen, self.device, self.dtype)
        batch = Batch(x0=x0, cond=cond, step=step)
        total = None
        logs: dict = {"stage": stage.name, "segments": stage.segments}
        for weight, term in stage.terms:
            value, extra = term(batch, stage, gen)
            logs.update(extra)
            total = value * weight if total is None else total + value * weight
        if total is None:
            raise ValueError(f"stage {stage.name} has no loss term")
        self.adapters.set_mode("student")
        if not torch.isfinite(total.detach()).all():
            raise NonFiniteLossError(step, stage, "loss")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        lr = learning_rate_at(self.lr, self.lr_schedule, step - stage_start, stage.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = self.adapters.student_parameters()
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        if not math.isfinite(float(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(step, stage, "gradient")
        self.optimizer.step()
        if not self.adapters.all_finite():
            raise NonFiniteLossError(step, stage, "LoRA weights")
        self.adapters.ema_update(self.ema_decay)
        logs["grad_norm"] = float(norm)
        logs["lr"] = lr
        return float(total.detach()), logs

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to continue: weights, EMA, optimizer state, step, signature."""
        return {
            "format": "hypersd-train-state/1",
            "step": int(self.step),
            "signature": dict(self.signature),
            "student": self.adapters.weights("hypersd"),
            "ema": self.adapters.weights("hypersd_ema"),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "history": [float(x) for x in self.history],
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("format") != "hypersd-train-state/1":
            raise ValueError("not a Hyper-SD training state")
        if sd.get("signature", {}) != self.signature:
            diff = sorted(k for k in set(sd.get("signature", {})) | set(self.signature)
                          if sd.get("signature", {}).get(k) != self.signature.get(k))
            raise ValueError(f"the saved training state was made with different settings ({', '.join(diff)})")
        self.adapters.load_weights(sd["student"], "hypersd")
        self.adapters.load_weights(sd["ema"], "hypersd_ema")
        self.optimizer.load_state_dict(sd["optimizer"])
        self.step = int(sd["step"])
        self.history = list(sd.get("history", []))
        self.last_loss = self.history[-1] if self.history else None


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu").clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


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


def recommended_settings(last_segments: int) -> dict[str, str]:
    """Sampling settings for a LoRA whose last stage had ``last_segments`` segments."""
    if last_segments == 1:
        return {"steps": "1", "cfg": "1.0", "sampler": "tcd", "schedule": "tcd", "eta": "1.0"}
    return {"steps": str(last_segments), "cfg": "1.0", "sampler": "ddim", "schedule": "trailing", "eta": "0.0"}
