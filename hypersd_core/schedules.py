"""Hyper-SD timestep grids and their sigmas.

All grids are lists of integer timesteps on the 1000-step training schedule, from the
noisiest down. ``hypersd_sigmas`` turns a grid into the descending SIGMAS a k-diffusion
sampler expects (ending with 0), through any ``model_sampling`` object that has
``sigma(t)`` (ComfyUI's, or ``DiscreteSchedule`` below).

Grids (SD1.5/SDXL, 1000 training steps):

* ``trailing`` (DDIM "trailing" spacing, the N-step Hyper-SD LoRAs): with N steps,
  ``t_i = round(T - i * T / N) - 1``; N=4 gives 999, 749, 499, 249.
* ``tcd`` (the unified LoRA; diffusers' ``TCDScheduler``): the 50-step origin grid
  ``{20 k - 1 : k = 1..50}``, reversed, sampled at ``floor(linspace(0, 50, N))``;
  N=4 gives 999, 759, 499, 259.
* ``segments`` (a TSCD LoRA trained with k segments, k = N): the top timestep followed by
  the upper edges of the lower segments, ``[T-1] + [(k-j) * floor(T/k) - 1 : j = 1..k-1]``;
  k=4 gives 999, 749, 499, 249, so each step starts at the top of a segment, which the
  student maps to that segment's lower edge.

Partial denoise (img2img) follows ComfyUI's convention: the grid for
``int(steps / denoise)`` steps is built and its last ``steps`` entries are kept.
"""
from __future__ import annotations

import math

import torch

from .metadata import NUM_TRAIN_TIMESTEPS

TCD_ORIGIN_STEPS = 50
MODES = ("trailing", "tcd", "segments")


def _check_steps(steps: int, T: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool):
        raise TypeError(f"steps must be an integer, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if steps > T:
        raise ValueError(f"steps must be at most {T} (the training schedule's length), got {steps}")


def trailing_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """DDIM "trailing" spacing: ``round(T - i*T/N) - 1`` for i = 0..N-1."""
    T = num_train_timesteps
    _check_steps(steps, T)
    return [int(round(T - i * T / steps)) - 1 for i in range(steps)]


def tcd_timesteps(steps: int, original_steps: int = TCD_ORIGIN_STEPS,
                  num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """TCD's grid: N entries of the reversed ``original_steps`` origin grid.

    1. origin grid ``c*k - 1`` for k = 1..original_steps with ``c = T // original_steps``;
    2. reverse it (noisiest first);
    3. keep the entries at ``floor(linspace(0, original_steps, N, endpoint=False))``.
    """
    T = num_train_timesteps
    _check_steps(steps, T)
    if steps > original_steps:
        raise ValueError(f"tcd mode has at most {original_steps} steps (its origin grid); got {steps}. "
                         "Use trailing mode for more steps.")
    c = T // original_steps
    origin = [c * k - 1 for k in range(1, original_steps + 1)][::-1]
    idx = [int(math.floor(i * original_steps / steps)) for i in range(steps)]
    return [origin[i] for i in idx]


def segment_timesteps(segments: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """Top timestep, then the upper edge of each lower segment of a k-segment TSCD model."""
    T = num_train_timesteps
    _check_steps(segments, T)
    width = T // segments
    return [T - 1] + [(segments - j) * width - 1 for j in range(1, segments)]


def segment_edge(t, segments: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """Lower edge ``t_b = floor(t / floor(T/k)) * floor(T/k)`` of the segment that holds ``t``.

    ``t`` is an integer or an integer tensor (TSCD training uses it on whole batches).
    """
    if not 1 <= segments <= num_train_timesteps:
        raise ValueError(f"segments must be in [1, {num_train_timesteps}], got {segments}")
    width = num_train_timesteps // segments
    return (t // width) * width


GRIDS = {"trailing": trailing_timesteps, "tcd": tcd_timesteps, "segments": segment_timesteps}


def hypersd_timesteps(steps: int, mode: str, denoise: float = 1.0) -> list[int]:
    """The timesteps of ``mode`` for ``steps`` steps, cut for partial denoise."""
    if mode not in GRIDS:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    _check_steps(steps, NUM_TRAIN_TIMESTEPS)
    if not (0.0 < float(denoise) <= 1.0):
        raise ValueError(f"denoise must be in (0, 1], got {denoise}; use 1.0 for text-to-image, "
                         "lower values to keep more of the input latent")
    total = steps if denoise >= 1.0 else int(steps / denoise)
    if mode == "tcd":
        total = min(total, TCD_ORIGIN_STEPS)
    return GRIDS[mode](max(total, steps))[-steps:]


def sigmas_from_timesteps(model_sampling, timesteps) -> torch.Tensor:
    """``[sigma(t_0), ..., sigma(t_{N-1}), 0]`` as float32."""
    ts = torch.as_tensor(list(timesteps), dtype=torch.float32)
    sig = model_sampling.sigma(ts).to(torch.float32).cpu()
    return torch.cat([sig, sig.new_zeros([1])])


def hypersd_sigmas(model_sampling, steps: int, mode: str = "trailing", denoise: float = 1.0) -> torch.Tensor:
    """SIGMAS for a Hyper-SD recipe (see the module docstring for the grids)."""
    return sigmas_from_timesteps(model_sampling, hypersd_timesteps(steps, mode, denoise))


def one_step_timestep(timestep: int = 800, denoise: float = 1.0) -> int:
    """The start timestep of one-step sampling: ``round(timestep * denoise)``."""
    if not (1 <= int(timestep) <= NUM_TRAIN_TIMESTEPS - 1):
        raise ValueError(f"timestep must be in 1..{NUM_TRAIN_TIMESTEPS - 1}, got {timestep} "
                         "(800 is the official one-step UNet's)")
    if not (0.0 < float(denoise) <= 1.0):
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    return max(1, int(round(int(timestep) * float(denoise))))


def one_step_sigmas(model_sampling, timestep: int = 800, denoise: float = 1.0) -> torch.Tensor:
    """``[sigma(t), 0]``: the one-step UNet's schedule (t = 800 officially)."""
    return sigmas_from_timesteps(model_sampling, [one_step_timestep(timestep, denoise)])


class DiscreteSchedule:
    """SD1.5/SDXL's discrete eps schedule (scaled-linear betas) in sigma space.

    ``alpha_bar_t = prod_{s<=t} (1 - beta_s)``, ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``;
    a VP sample ``x_vp = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps`` is the VE sample
    ``x = x0 + sigma eps`` times ``sqrt(alpha_bar)``. Same interface as ComfyUI's
    ``ModelSamplingDiscrete`` (``sigma``, ``timestep``, ``noise_scaling``), for use outside it.
    """

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012,
                 num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).float()
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        dists = sigma.log().reshape(-1)[None, :] - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timestep, dtype=torch.float32).clamp(0, len(self.sigmas) - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t.frac()
        return (self.log_sigmas[low] * (1 - w) + self.log_sigmas[high] * w).exp()

    def noise_scaling(self, sigma, noise, latent_image, max_denoise: bool = False):
        sigma = torch.as_tensor(sigma, dtype=noise.dtype).reshape([-1] + [1] * (noise.ndim - 1))
        scale = torch.sqrt(1.0 + sigma ** 2) if max_denoise else sigma
        return noise * scale + latent_image
