"""Human feedback learning (Hyper-SD part 2, section 3.2; ImageReward's ReFL), in plain torch.

The feedback is a LoRA of its own, trained on top of a frozen few-step LoRA (TSCD or
unified), so that it can be merged back at a chosen ratio. In the pipeline the frozen LoRA
is part of the base (the host applies it before the adapters go in) and the trained
``student`` adapter is the feedback LoRA: no gradient reaches the frozen LoRA or the base.

Aesthetic term (eq. 7), one step of :class:`FeedbackLoss`:

1. draw noise ``z`` and a late step ``j`` of the student's own ``k``-step schedule (the DDIM
   trailing grid ``t_0 = 999 > t_1 > ... > t_{k-1}``; ``j`` uniform over its later half,
   ReFL's and the paper's choice, or over the whole schedule, ``t_0`` included
   (``SCORED_STEPS``); ``j = 0`` at one step);
2. without gradient, run the schedule from ``z`` to ``x_{t_j}``: at each step the student's
   ``x0`` and a move to the next timestep, deterministic (DDIM, ``eta = 0``) or TCD's
   (``eta > 0``: to ``s' = (1 - eta) s``, then forward noise back to ``s``);
3. with gradient, predict ``x0`` in one step from ``x_{t_j}``::

       x0 = (x_t - sqrt(1 - a_t) * eps_student(x_t, t)) / sqrt(a_t)

4. decode ``x0`` with gradient (``decode``: latent -> images in [0, 1]) and score it with
   each reward ``d``: ``L_aes = sum_d w_d * mean(ReLU(alpha_d - r_d(image, c)))``.

Anchor term (not in the paper, off by default; weight ``anchor_weight``): the mean squared
difference of step 3's ``x0`` from the frozen LoRA's own one-step ``x0`` at the same ``x_{t_j}``
(the feedback adapter off, without gradient)::

    L_anchor = mean((x0 - x0_frozen)^2)

The hinge gives no gradient to a picture that already scores its margin, but nothing holds
such a picture where it was: the anchor does, so the feedback changes what the rewards ask
for and little else (the merge ratio, by contrast, scales every change at once).

Structure term (the paper's perception loss, weight ``structure_weight``): noise a real
training latent to a middle timestep (uniform in ``structure_t``), predict its ``x0`` in
one step with gradient, decode, and apply each reward's own supervised loss against the
real image's label (a classifier's cross-entropy). It is backpropagated first, at once
(``Batch.backward_now``), so a step holds one decoder graph at a time.

Labels: a batch's ``cond`` is its prompt's index (or None with one prompt);
``prompt_labels[i]`` is the class of prompt ``i`` for rewards that score an image against
its class.

The merge (:func:`hypersd_core.lora_merge.merge_cat`) is exact: the feedback LoRA at ratio
``r`` concatenated with the frozen LoRA, rank ``r1 + r2``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .dmd import trailing_grid
from .rewards import hinge
from .train import Batch, NonFiniteLossError
from .tscd import EpsFn, add_noise, predict_x0

LATE_FRACTION = 0.5  # the late steps: the later half of the student's schedule
# the steps of the student's schedule the one-step picture is taken from -> the fraction of the
# schedule (from its end) that ``j`` is drawn from: the later half (ReFL, the paper), or every step,
# the first included (the reward then also shapes the early steps, where a picture's content is
# decided: on the toy's unified LoRA this kept the pictures nearer the data at 2 and 4 steps)
SCORED_STEPS = {"late half": LATE_FRACTION, "whole schedule": 1.0}
DEFAULT_SCORED_STEPS = "late half"
STRUCTURE_T = (300, 700)  # the middle timesteps a real latent is noised to for the structure term
DEFAULT_MARGIN = 0.0


@dataclass(frozen=True)
class RewardTerm:
    """A reward with its hinge margin ``alpha_d`` and weight ``w_d``."""

    reward: object  # hypersd_core.rewards.Reward
    margin: float = DEFAULT_MARGIN
    weight: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.margin) and math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"reward {getattr(self.reward, 'name', '?')!r}: margin must be a number and weight "
                             f"0 or more, got margin {self.margin}, weight {self.weight}")


def check_settings(sample_steps: int, eta: float, structure_weight: float, T: int = 1000,
                   anchor_weight: float = 0.0) -> None:
    """Refuse settings outside what the method allows, saying what to use."""
    if not 1 <= int(sample_steps) <= 50:
        raise ValueError(f"the student's schedule for feedback must have 1 to 50 steps (the LoRA's own step count, "
                         f"e.g. 4 for a 4-step LoRA), got {sample_steps}")
    if not (math.isfinite(eta) and 0.0 <= eta <= 1.0):
        raise ValueError(f"feedback eta must be in [0, 1] (0: DDIM, the k-step LoRAs' sampler; TCD's eta for a "
                         f"unified LoRA), got {eta}")
    if not (math.isfinite(structure_weight) and structure_weight >= 0):
        raise ValueError(f"structure weight must be 0 (off) or more, got {structure_weight}")
    if not (math.isfinite(anchor_weight) and anchor_weight >= 0):
        raise ValueError(f"anchor weight must be 0 (off) or more, got {anchor_weight}")


def late_fraction_of(scored_steps: str) -> float:
    """The fraction of the schedule that :func:`late_index` draws from, for a ``SCORED_STEPS`` name."""
    if scored_steps not in SCORED_STEPS:
        raise ValueError(f"scored steps must be one of {', '.join(repr(k) for k in SCORED_STEPS)} (where on the "
                         f"LoRA's schedule the rewards score the one-step picture), got {scored_steps!r}")
    return SCORED_STEPS[scored_steps]


def late_index(steps: int, gen: torch.Generator, late_fraction: float = LATE_FRACTION) -> int:
    """Step 1: a late index ``j`` of a ``steps``-step schedule (uniform over its last ``late_fraction``;
    1: any step)."""
    if not (math.isfinite(late_fraction) and 0.0 < late_fraction <= 1.0):
        raise ValueError(f"the late fraction of the schedule must be in (0, 1], got {late_fraction}")
    first = min(int(steps) - 1, int(math.floor(int(steps) * (1.0 - late_fraction))))
    return int(torch.randint(first, int(steps), (1,), generator=gen))


def sampler_move(x_t: torch.Tensor, eps: torch.Tensor, ab: torch.Tensor, t: int, s: int, eta: float,
                 gen: torch.Generator, batch: Batch | None = None) -> torch.Tensor:
    """Step 2's move from ``t`` to ``s < t``: DDIM at ``eta = 0``; else TCD's (to ``s' = (1 - eta) s``
    along the prediction, then forward noise from ``s'`` back to ``s``; data parallel: ``batch``
    draws that noise for the global batch)."""
    x0 = predict_x0(x_t, eps, ab[t].expand(x_t.shape[0]))
    s_prime = int(math.floor((1.0 - eta) * s)) if eta > 0 else s
    a_sp = ab[s_prime].expand(x_t.shape[0])
    x = add_noise(x0, eps, a_sp)
    if s_prime != s:
        ratio = (ab[s] / ab[s_prime]).expand(x_t.shape[0])
        n = (batch or Batch(x0=x)).randn(gen, x)
        x = add_noise(x, n, ratio)  # x_s = sqrt(a_s/a_s') x_s' + sqrt(1 - a_s/a_s') n
    return x


class FeedbackLoss:
    """The feedback loss term (a loss term of :class:`~.train.Stage`); see the module docstring.

    ``decode(latents) -> images [B, 3, H, W] in [0, 1]`` with gradient; ``rewards``:
    :class:`RewardTerm` s; ``sample_steps``: the student's schedule (a k-step LoRA's k)."""

    def __init__(self, eps_fn: EpsFn, adapters, alphas_cumprod: torch.Tensor, *,
                 decode: Callable[[torch.Tensor], torch.Tensor], rewards: Sequence[RewardTerm], sample_steps: int,
                 eta: float = 0.0, structure_weight: float = 0.0, prompt_labels: Sequence[int] | None = None,
                 structure_t: tuple[int, int] = STRUCTURE_T, late_fraction: float = LATE_FRACTION,
                 anchor_weight: float = 0.0):
        T = int(alphas_cumprod.shape[0])
        check_settings(sample_steps, eta, structure_weight, T, anchor_weight)
        rewards = list(rewards)
        if not rewards:
            raise ValueError("feedback learning needs at least one reward model")
        if structure_weight > 0 and not any(hasattr(r.reward, "supervised_loss") for r in rewards):
            raise ValueError("the structure term needs a reward with a supervised loss (a classifier reward); "
                             "set structure_weight to 0 or add one")
        if not 0 <= structure_t[0] <= structure_t[1] < T:
            raise ValueError(f"structure timesteps must satisfy 0 <= low <= high < {T}, got {structure_t}")
        self.eps_fn, self.adapters, self.decode = eps_fn, adapters, decode
        self.ab = alphas_cumprod.detach().float()
        self.T = T
        self.rewards = rewards
        self.grid = trailing_grid(int(sample_steps), T)
        self.eta = float(eta)
        self.structure_weight = float(structure_weight)
        self.prompt_labels = list(prompt_labels) if prompt_labels is not None else None
        self.structure_t = (int(structure_t[0]), int(structure_t[1]))
        self.late_fraction = float(late_fraction)
        self.anchor_weight = float(anchor_weight)

    # ------------------------------------------------------------------ parts
    def labels(self, cond, batch_size: int, device) -> torch.Tensor | None:
        """The class of each image of a batch whose prompt is ``cond`` (None: the only prompt)."""
        if self.prompt_labels is None:
            return None
        index = 0 if cond is None else int(cond)
        if not 0 <= index < len(self.prompt_labels):
            raise ValueError(f"no class given for prompt {index + 1} (classes given for {len(self.prompt_labels)})")
        return torch.full((batch_size,), int(self.prompt_labels[index]), dtype=torch.long, device=device)

    def eps(self, x_t: torch.Tensor, t: int, cond) -> torch.Tensor:
        tt = torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=x_t.device)
        return self.eps_fn(x_t, tt, 1.0, cond)

    @torch.no_grad()
    def run_to(self, z: torch.Tensor, j: int, cond, gen: torch.Generator, batch: Batch | None = None) -> torch.Tensor:
        """Step 2: the student's schedule from ``z`` (at ``t_0``) to ``x_{t_j}``, without gradient."""
        x = z
        for i in range(j):
            x = sampler_move(x, self.eps(x, self.grid[i], cond), self.ab, self.grid[i], self.grid[i + 1], self.eta, gen,
                             batch)
        return x

    def one_step_x0(self, x_t: torch.Tensor, t: int, cond) -> torch.Tensor:
        """Step 3: ``x0`` from ``x_t`` in one student call (gradient as the caller allows)."""
        return predict_x0(x_t, self.eps(x_t, t, cond), self.ab[int(t)].expand(x_t.shape[0]))

    @torch.no_grad()
    def frozen_x0(self, x_t: torch.Tensor, t: int, cond) -> torch.Tensor:
        """The anchor's reference: the frozen LoRA's one-step ``x0`` (the feedback adapter off)."""
        self.adapters.set_mode("teacher")
        try:
            return self.one_step_x0(x_t, t, cond)
        finally:
            self.adapters.set_mode("student")

    def aesthetic(self, images: torch.Tensor, labels) -> tuple[torch.Tensor, dict]:
        """Step 4: ``sum_d w_d mean(ReLU(alpha_d - r_d))`` and each reward's mean score."""
        total, logs = None, {}
        for term in self.rewards:
            r = term.reward(images, labels if getattr(term.reward, "needs_labels", False) else None)
            part = term.weight * hinge(r, term.margin).mean()
            total = part if total is None else total + part
            logs[f"reward_{getattr(term.reward, 'name', 'reward')}"] = float(r.detach().float().mean())
        return total, logs

    def structure(self, x0_real: torch.Tensor, cond, gen: torch.Generator, batch: Batch | None = None) -> torch.Tensor:
        """The structure term's loss (before its weight) on real latents ``x0_real``."""
        B = x0_real.shape[0]
        t = int(torch.randint(self.structure_t[0], self.structure_t[1] + 1, (1,), generator=gen))
        n = (batch or Batch(x0=x0_real)).randn(gen, x0_real)
        x_t = add_noise(x0_real, n, self.ab[t].expand(B))
        images = self.decode(self.one_step_x0(x_t, t, cond))
        labels = self.labels(cond, B, x0_real.device)
        parts = [term.reward.supervised_loss(images, labels) for term in self.rewards
                 if hasattr(term.reward, "supervised_loss")]
        return sum(parts) / len(parts)

    data_parallel = True  # every draw for the global batch (``Batch.randn``); the means average over processes

    # ------------------------------------------------------------------ the term
    def __call__(self, batch, stage, generator: torch.Generator):
        cond = batch.cond
        logs: dict = {}
        self.adapters.set_mode("student")
        structure = None
        if self.structure_weight > 0:  # backpropagated at once: one decoder graph held at a time
            s = self.structure(batch.x0, cond, generator, batch)
            if not torch.isfinite(s.detach()):
                raise NonFiniteLossError(batch.step, stage, "structure loss")
            structure = batch.backward_now(self.structure_weight * s)
            logs["structure_loss"] = float(s.detach())
        # 1. noise and a late step of the student's schedule
        z = batch.randn(generator, batch.x0)
        j = late_index(len(self.grid), generator, self.late_fraction)
        # 2. the schedule to x_{t_j} without gradient; 3. x0 in one step with gradient
        x_t = self.run_to(z, j, cond, generator, batch)
        x0 = self.one_step_x0(x_t, self.grid[j], cond)
        # 4. decode and score
        loss, extra = self.aesthetic(self.decode(x0), self.labels(cond, x0.shape[0], x0.device))
        logs.update(extra)
        if self.anchor_weight > 0:  # the anchor: stay near the frozen LoRA's picture
            anchor = torch.nn.functional.mse_loss(x0.float(), self.frozen_x0(x_t, self.grid[j], cond).float())
            loss = loss + self.anchor_weight * anchor
            logs["anchor_loss"] = float(anchor.detach())
        logs["feedback_t"] = self.grid[j]
        logs["aesthetic_loss"] = float(loss.detach())
        if structure is not None:
            loss = loss + structure
        return loss, logs
