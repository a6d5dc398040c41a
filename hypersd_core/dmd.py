"""Score distillation for one step (Hyper-SD part 3; DMD and DMD2), in plain torch.

The generator ``G`` is the student adapter called once, at timestep ``t_g`` (999 for the
unified LoRA, 800 for a dedicated one-step LoRA as the official one-step UNet uses), on
pure noise ``z``::

    x = G(z) = (z - sqrt(1 - a_g) * eps_student(z, t_g)) / sqrt(a_g)

Distribution matching (DMD2's form of the gradient of ``KL(p_fake || p_real)``): noise ``x``
to a random ``t`` in ``[t_min, t_max]``, ask the real score (the base with adapters off, at
the teacher's cfg) and the fake score (a third LoRA adapter on the same base, at cfg 1) for
their ``x0``, and move ``x`` towards the real one::

    grad = (x0_fake - x0_real) / mean|x - x0_real|          (per sample)
    L_dm = 0.5 * || x - stopgrad(x - grad) ||^2              (so dL/dx = grad)

The fake score follows the generator: before each generator update it takes
``fake_updates`` AdamW steps of the plain noise-prediction loss on the generator's current
(detached) samples, at ``t`` uniform in ``[0, T)`` (DMD2's two time-scale rule: 10 for SD1.5).
It starts as a no-op adapter, so it starts equal to the teacher.

Regression (DMD's guard against mode collapse; Hyper-SD: "an MSE loss alongside"): a fixed
bank of noises and prompts whose teacher ODE outputs (DDIM on the trailing grid at the
teacher's cfg) are computed once per run (:class:`RegressionBank`) and kept in the training
state; ``L_reg = || G(z_bank) - x_teacher ||^2`` with weight ``regression_weight``.

One step of :class:`DMDLoss` (a loss term of :class:`~.train.Stage`):

1. draw ``z`` (the step's generator) and sample ``x = G(z)`` without gradient;
2. ``fake_updates`` fake-score steps on ``x`` (fresh ``t`` and noise each);
3. the regression loss on a bank entry, backpropagated at once (``Batch.backward_now``), so
   its activations are freed before the next forward: a step holds one generator graph, and
   its peak memory stays near a TSCD step's;
4. ``x = G(z)`` again with gradient (the fake steps never fall between a forward and its
   backward, so the student's gradient is never lost to a frozen adapter), and the
   distribution-matching loss on ``x``; the trainer backpropagates it.

Everything that decides the next step (fake adapter, its optimizer, the bank) is in
:meth:`DMDLoss.state_dict`, which :class:`~.train.Trainer` saves with the student, so
Cancel and resume continue exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .lora_train import FAKE
from .train import Batch, NonFiniteLossError, _to_cpu
from .tscd import EpsFn, ModeSwitch, add_noise, ddim_jump, predict_x0

GENERATOR_T_UNIFIED = 999  # the unified LoRA: one step from t = 999
GENERATOR_T_ONE_STEP = 800  # a dedicated one-step model (the official one-step UNet's timestep)
T_MIN, T_MAX = 20, 980  # DMD2's range of the distribution-matching timestep
DEFAULT_FAKE_UPDATES = 5
DEFAULT_REGRESSION_WEIGHT = 0.25  # DMD's regression weight (it used LPIPS; the toy decides ours)
# The TSCD term kept beside distribution matching in the score stage (its weight; 0 = none): only
# the generator at t_g is trained by distribution matching, and without the consistency term the
# LoRA's 2-8 step quality drifts away as the one-step quality rises (measured on the toy).
DEFAULT_SCORE_TSCD_WEIGHT = 1.0
BANK_BATCHES, BANK_ODE_STEPS = 4, 25  # the regression bank: batches of the run's batch size, teacher ODE steps


def check_settings(generator_t: int, fake_updates: int, regression_weight: float, T: int = 1000,
                   tscd_weight: float = 0.0) -> None:
    """Refuse settings outside what the method allows, saying what to use (``tscd_weight``: the
    score stage's TSCD term, :data:`DEFAULT_SCORE_TSCD_WEIGHT`)."""
    if not 1 <= int(generator_t) <= T - 1:
        raise ValueError(f"generator timestep must be in [1, {T - 1}] (999 for a unified LoRA, 800 for a "
                         f"one-step LoRA), got {generator_t}")
    if not 1 <= int(fake_updates) <= 50:
        raise ValueError(f"fake-score updates per generator step must be in [1, 50] (DMD2: 10 for SD1.5, 5 for "
                         f"SDXL), got {fake_updates}")
    if not (math.isfinite(regression_weight) and regression_weight >= 0):
        raise ValueError(f"regression weight must be 0 or more (0 turns the regression off), got {regression_weight}")
    if not (math.isfinite(tscd_weight) and tscd_weight >= 0):
        raise ValueError(f"score_tscd_weight must be 0 (distribution matching alone) or more, got {tscd_weight}")


@dataclass
class BankEntry:
    noise: torch.Tensor  # z, (B, C, H, W)
    cond: Any  # the prompt of the batch it came from
    target: torch.Tensor  # the teacher's ODE output from z


class RegressionBank:
    """Fixed noises and prompts with the teacher's ODE output from each, made once per run."""

    def __init__(self, entries: list[BankEntry]):
        if not entries:
            raise ValueError("the regression bank needs at least one entry")
        self.entries = entries

    @classmethod
    @torch.no_grad()
    def build(cls, eps_fn: EpsFn, adapters: ModeSwitch, alphas_cumprod: torch.Tensor, data, *, batches: int,
              batch_size: int, teacher_cfg: float, ode_steps: int, seed: int, device=None,
              dtype=torch.float32) -> "RegressionBank":
        """``batches`` entries of ``batch_size``: prompt from ``data`` (seeded), noise, and the
        teacher's DDIM trailing ODE over ``ode_steps`` from ``t = T - 1`` at ``teacher_cfg``."""
        gen = torch.Generator().manual_seed(int(seed) * 7_777 + 4_242)
        ab = alphas_cumprod.detach().float()
        T = ab.shape[0]
        grid = trailing_grid(ode_steps, T)
        entries = []
        adapters.set_mode("teacher")
        for _ in range(int(batches)):
            x0, cond = data.sample(batch_size, gen, device or torch.device("cpu"), dtype)
            z = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(x0.device, dtype)
            x = z
            for i, t in enumerate(grid):
                tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
                eps = eps_fn(x, tt, teacher_cfg, cond)
                a_to = ab[grid[i + 1]] if i + 1 < len(grid) else torch.tensor(1.0)
                x = ddim_jump(x, eps, ab[t].expand(x.shape[0]), a_to.expand(x.shape[0]))
            entries.append(BankEntry(noise=z.detach().cpu(), cond=cond, target=x.detach().cpu()))
        return cls(entries)

    def entry(self, step: int) -> BankEntry:
        return self.entries[int(step) % len(self.entries)]

    def tensors(self) -> dict:
        return {"noise": [e.noise for e in self.entries], "target": [e.target for e in self.entries]}

    def load_tensors(self, sd: dict) -> None:
        if len(sd["noise"]) != len(self.entries):
            raise ValueError(f"the saved regression bank has {len(sd['noise'])} entries, this run {len(self.entries)}")
        for e, z, x in zip(self.entries, sd["noise"], sd["target"]):
            e.noise, e.target = z.clone(), x.clone()


def trailing_grid(steps: int, T: int = 1000) -> list[int]:
    """DDIM "trailing" timesteps, high to low: ``T - 1 - round(i * T / steps)`` for i < steps."""
    if not 1 <= int(steps) <= T:
        raise ValueError(f"ODE steps must be in [1, {T}], got {steps}")
    return [int(T - 1 - round(i * T / steps)) for i in range(int(steps))]


class DMDLoss:
    """Distribution matching + regression for the student as a one-step generator.

    ``adapters`` must have the fake adapter (``LoraAdapters(..., fake=True)``). ``fake_lr``:
    the fake score's AdamW rate (DMD2 uses the generator's); ``fake_grad_clip``: 10 as DMD2.
    """

    def __init__(self, eps_fn: EpsFn, adapters, alphas_cumprod: torch.Tensor, *, teacher_cfg: float,
                 generator_t: int = GENERATOR_T_UNIFIED, fake_updates: int = DEFAULT_FAKE_UPDATES,
                 fake_lr: float = 1e-4, fake_grad_clip: float = 10.0, regression_weight: float = DEFAULT_REGRESSION_WEIGHT,
                 bank: RegressionBank | None = None, t_min: int = T_MIN, t_max: int = T_MAX):
        T = int(alphas_cumprod.shape[0])
        check_settings(generator_t, fake_updates, regression_weight, T)
        if regression_weight > 0 and bank is None:
            raise ValueError("a regression weight above 0 needs the regression bank (RegressionBank.build)")
        if not 0 <= t_min <= t_max < T:
            raise ValueError(f"distribution-matching timesteps must satisfy 0 <= t_min <= t_max < {T}")
        self.eps_fn = eps_fn
        self.adapters = adapters
        self.ab = alphas_cumprod.detach().float()
        self.T = T
        self.teacher_cfg = float(teacher_cfg)
        self.generator_t = int(generator_t)
        self.fake_updates = int(fake_updates)
        self.fake_grad_clip = float(fake_grad_clip)
        self.regression_weight = float(regression_weight)
        self.bank = bank
        self.t_min, self.t_max = int(t_min), int(t_max)
        self.fake_optimizer = torch.optim.AdamW(adapters.fake_parameters(), lr=float(fake_lr), weight_decay=0.0)

    # ------------------------------------------------------------------ parts
    def generate(self, z: torch.Tensor, cond) -> torch.Tensor:
        """``G(z)``: the student's x0 from pure noise at ``generator_t`` (gradient as the caller allows)."""
        self.adapters.set_mode("student")
        t = torch.full((z.shape[0],), self.generator_t, dtype=torch.long, device=z.device)
        eps = self.eps_fn(z, t, 1.0, cond)
        return predict_x0(z, eps, self.ab[self.generator_t].expand(z.shape[0]))

    def fake_step(self, x: torch.Tensor, cond, gen: torch.Generator, batch: Batch | None = None) -> float:
        """One noise-prediction step of the fake score on detached generator samples ``x`` (data
        parallel: ``batch`` draws for the global batch and averages the fake score's gradients)."""
        batch = batch or Batch(x0=x)
        t = batch.randint(0, self.T, gen)
        n = batch.randn(gen, x)
        x_t = add_noise(x, n, self.ab[t])
        self.adapters.set_mode("fake")
        with torch.enable_grad():
            eps = self.eps_fn(x_t, t.to(x.device), 1.0, cond)
            loss = torch.nn.functional.mse_loss(eps.float(), n.float())
            self.fake_optimizer.zero_grad(set_to_none=True)
            loss.backward()
        params = self.adapters.fake_parameters()
        value = batch.average(params, float(loss.detach()))
        norm = torch.nn.utils.clip_grad_norm_(params, self.fake_grad_clip) if self.fake_grad_clip > 0 else None
        if not math.isfinite(value) or (norm is not None and not math.isfinite(float(norm))):
            self.fake_optimizer.zero_grad(set_to_none=True)
            return math.nan  # the caller stops the run (NonFiniteLossError), nothing was stepped
        self.fake_optimizer.step()
        return value

    def distribution_matching(self, x: torch.Tensor, cond, gen: torch.Generator,
                              batch: Batch | None = None) -> tuple[torch.Tensor, dict]:
        """``L_dm`` for generator samples ``x`` (with gradient) and its logs."""
        batch = batch or Batch(x0=x)
        t = batch.randint(self.t_min, self.t_max + 1, gen)
        n = batch.randn(gen, x)
        a_t = self.ab[t]
        with torch.no_grad():
            xd = x.detach()
            x_t = add_noise(xd, n, a_t)
            td = t.to(x.device)
            self.adapters.set_mode("teacher")
            x0_real = predict_x0(x_t, self.eps_fn(x_t, td, self.teacher_cfg, cond), a_t)
            self.adapters.set_mode("fake")
            x0_fake = predict_x0(x_t, self.eps_fn(x_t, td, 1.0, cond), a_t)
            norm = (xd - x0_real).abs().mean(dim=tuple(range(1, x.dim())), keepdim=True).clamp_min(1e-6)
            grad = torch.nan_to_num((x0_fake - x0_real) / norm)
        self.adapters.set_mode("student")
        loss = 0.5 * torch.nn.functional.mse_loss(x.float(), (xd - grad).float())
        return loss, {"dmd_grad_norm": float(grad.float().pow(2).mean().sqrt()), "dmd_t_mean": float(t.float().mean())}

    data_parallel = True  # draws for the global batch; the fake score's gradients averaged (``Batch.average``)

    # ------------------------------------------------------------------ the term
    def __call__(self, batch, stage, generator: torch.Generator):
        cond = batch.cond
        z = batch.randn(generator, batch.x0)  # data parallel: drawn for the global batch, this process's rows
        # 1-2. the fake score catches up with the generator's current samples
        with torch.no_grad():
            x_now = self.generate(z, cond)
        fake_losses = []
        for _ in range(self.fake_updates):
            fake_losses.append(self.fake_step(x_now, cond, generator, batch))
            if not math.isfinite(fake_losses[-1]):
                self.adapters.set_mode("student")
                raise NonFiniteLossError(batch.step, stage, "fake score's loss or gradient")
        # 3. regression to the teacher's ODE outputs, backpropagated at once: its activations are
        #    freed before the generator's own forward, so a step holds one generator graph at a time
        reg = None
        if self.regression_weight > 0:
            e = self.bank.entry(batch.step)  # built for the global batch: this process takes its rows
            dev = batch.x0.device
            x_reg = self.generate(batch.mine(e.noise).to(dev, batch.x0.dtype), e.cond)
            reg = torch.nn.functional.mse_loss(x_reg.float(), batch.mine(e.target).to(dev).float())
            if not torch.isfinite(reg.detach()):
                raise NonFiniteLossError(batch.step, stage, "regression loss")
            reg = batch.backward_now(self.regression_weight * reg)
            del x_reg
        # 4. the generator, with gradient, and the distribution-matching loss
        x = self.generate(z, cond)
        loss, logs = self.distribution_matching(x, cond, generator, batch)
        logs["fake_loss"] = sum(fake_losses) / len(fake_losses)
        logs["dmd_loss"] = float(loss.detach())
        if reg is not None:
            logs["regression_loss"] = float(reg) / self.regression_weight
            loss = loss + reg
        self.adapters.set_mode("student")
        return loss, logs

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"fake": self.adapters.weights(FAKE), "fake_optimizer": _to_cpu(self.fake_optimizer.state_dict()),
                "bank": self.bank.tensors() if self.bank is not None else None}

    def load_state_dict(self, sd: dict) -> None:
        self.adapters.load_weights(sd["fake"], FAKE)
        self.fake_optimizer.load_state_dict(sd["fake_optimizer"])
        if self.bank is not None and sd.get("bank") is not None:
            self.bank.load_tensors(sd["bank"])
