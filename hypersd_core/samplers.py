"""Few-step samplers in the k-diffusion signature (``model, x, sigmas, extra_args, callback, disable``).

``model(x, sigma, **extra_args)`` returns the denoised sample ``x0``. Samples live in the
model's own space: for eps models (SD1.5/SDXL) ``x = x0 + sigma * eps`` (VE); for flow
models (SD3/FLUX) ``x = (1 - sigma) * x0 + sigma * eps``. Both are written as
``x = a(sigma) * x0 + s(sigma) * eps`` with ``a`` and ``s`` read off the model's
``noise_scaling``, so one implementation serves both.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import trange


def seeded_noise_sampler(x: torch.Tensor, seed: int | None = None):
    """``noise_sampler(sigma, sigma_next)`` drawing standard normal noise like ``x``.

    With a seed the draws come from a generator seeded once with it, so a fixed seed
    gives the same sequence of noises (ComfyUI passes the graph's seed in
    ``extra_args["seed"]``). Without one, torch's global generator is used.
    """
    gen = None
    if seed is not None:
        gen = torch.Generator(device=x.device)
        gen.manual_seed(int(seed))

    def sample(sigma, sigma_next):
        return torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=gen)

    return sample


def find_model_sampling(model):
    """The ``model_sampling`` of a ComfyUI sampler's model wrapper (duck-typed, no import)."""
    inner = getattr(model, "inner_model", None)
    patcher = getattr(inner, "model_patcher", None)
    if patcher is not None:
        return patcher.get_model_object("model_sampling")
    while inner is not None:
        ms = getattr(inner, "model_sampling", None)
        if ms is not None:
            return ms
        inner = getattr(inner, "inner_model", None)
    raise ValueError("the TCD sampler needs the model's timestep schedule: pass model_sampling=... "
                     "(an object with sigma(t), timestep(sigma) and noise_scaling)")


def _coefficients(model_sampling, sigma: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a(sigma)``, ``s(sigma)`` of ``x = a x0 + s eps``, read off ``noise_scaling``."""
    one = like.new_ones([1])
    zero = like.new_zeros([1])
    sig = sigma.reshape([1]).to(like)
    a = model_sampling.noise_scaling(sig, zero.clone(), one.clone())
    s = model_sampling.noise_scaling(sig, one.clone(), zero.clone())
    return a.reshape(()), s.reshape(())


def _timestep(model_sampling, sigma: torch.Tensor) -> float:
    if float(sigma) <= 0.0:
        return 0.0
    return float(model_sampling.timestep(sigma.reshape([1]).float()).reshape(()))


@torch.no_grad()
def sample_tcd(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
               eta: float = 0.3, model_sampling=None):
    """Trajectory Consistency Distillation sampling (TCD paper, Algorithm "strategic stochastic sampling").

    For each step ``sigma_i -> sigma_{i+1}`` (timesteps ``t -> t_prev``):

    1. ``x0 = model(x, sigma_i)``; ``eps = (x - a(sigma_i) x0) / s(sigma_i)``;
    2. ``t_s = floor((1 - eta) * t_prev)`` and ``sigma_s = sigma(t_s)``: the point the
       consistency jump goes to, below ``t_prev`` by the fraction ``eta`` (gamma in the paper);
    3. ``x_s = a(sigma_s) x0 + s(sigma_s) eps`` (a DDIM jump with the predicted noise);
    4. if ``eta > 0`` and this is not the last step, forward-diffuse ``x_s`` back up to
       ``t_prev``: ``x = (a_prev / a_s) x_s + sqrt(s_prev^2 - (a_prev s_s / a_s)^2) z``.

    ``eta = 0`` is deterministic DDIM (Euler for eps models, except that, as in diffusers,
    the last step lands on ``x0 + sigma(0) eps``); ``eta = 1`` jumps to ``t = 0`` and re-noises,
    as LCM does. Matches diffusers' ``TCDScheduler`` step for step (in VE space, i.e. after
    dividing diffusers' VP samples by ``sqrt(alpha_bar)``). With an inpainting mask the
    kept region ends exactly on the input latent.

    Args:
        eta: TCD's gamma in [0, 1]: the share of each step that is re-noised. Higher is more
            stochastic and smoother; lower keeps more detail. 0.3 is the common default,
            1.0 for a single step.
        model_sampling: the schedule (``sigma``, ``timestep``, ``noise_scaling``); taken from
            the ComfyUI model when not given.
    """
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}: 0 is deterministic DDIM, 1 is LCM-like, 0.3 the usual")
    if len(sigmas) < 2:
        raise ValueError("the TCD sampler needs at least two sigmas (one step); got "
                         f"{len(sigmas)}. Connect a scheduler with steps >= 1 and denoise > 0.")
    extra_args = {} if extra_args is None else extra_args
    if model_sampling is None:
        model_sampling = find_model_sampling(model)
    if noise_sampler is None:
        noise_sampler = seeded_noise_sampler(x, seed=extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])

    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        # 1. predict x0 and the noise it implies
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        a_t, s_t = _coefficients(model_sampling, sigma, x)
        eps = (x - a_t * denoised) / s_t
        # 2. the consistency target t_s below t_prev
        t_prev = _timestep(model_sampling, sigma_next)
        t_s = math.floor((1.0 - float(eta)) * t_prev)
        sigma_s = model_sampling.sigma(torch.tensor([float(t_s)])).reshape(()).to(x)
        # 3. jump to t_s along the predicted trajectory
        a_s, s_s = _coefficients(model_sampling, sigma_s, x)
        x = a_s * denoised + s_s * eps
        # 4. re-noise from t_s up to t_prev (never after the last step)
        if eta > 0 and float(sigma_next) > 0:
            a_p, s_p = _coefficients(model_sampling, sigma_next.to(x), x)
            ratio = a_p / a_s
            std = torch.sqrt(torch.clamp(s_p ** 2 - (ratio * s_s) ** 2, min=0.0))
            x = ratio * x + std * noise_sampler(sigma, sigma_next)
    return _restore_unmasked(model, x, extra_args)


def _restore_unmasked(model, x, extra_args):
    """With an inpainting mask, give back the kept region exactly.

    The last TCD step lands on ``x0 + sigma(0) eps`` (as diffusers does); in the region an
    inpainting mask keeps, that would add ``sigma(0)`` times the starting noise to the
    input. ComfyUI's inpainting wrapper exposes the input latent as ``latent_image``; the
    kept region is set back to it, as ComfyUI's own samplers leave it.
    """
    mask = extra_args.get("denoise_mask")
    latent = getattr(model, "latent_image", None)
    if mask is None or latent is None:
        return x
    mask = mask.to(x)
    return x * mask + latent.to(x) * (1.0 - mask)
