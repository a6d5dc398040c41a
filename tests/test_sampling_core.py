"""hypersd_core's schedules and TCD sampler against diffusers, the numerical reference."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, TCDScheduler

from ComfyUI_HyperSD.hypersd_core import samplers, schedules

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 6, 8, 12, 25])
def test_trailing_equals_diffusers_ddim_trailing(steps):
    ddim = DDIMScheduler(**SD_BETAS, timestep_spacing="trailing", set_alpha_to_one=False)
    ddim.set_timesteps(steps)
    assert schedules.trailing_timesteps(steps) == ddim.timesteps.tolist()


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6, 8, 10, 16, 50])
def test_tcd_grid_equals_diffusers_tcd(steps):
    tcd = TCDScheduler(**SD_BETAS)
    tcd.set_timesteps(steps)
    assert schedules.tcd_timesteps(steps) == tcd.timesteps.tolist()


def test_grids_match_the_reference_table():
    assert schedules.tcd_timesteps(4) == [999, 759, 499, 259]
    assert schedules.tcd_timesteps(8) == [999, 879, 759, 639, 499, 379, 259, 139]
    assert schedules.trailing_timesteps(8) == [999, 874, 749, 624, 499, 374, 249, 124]
    assert schedules.segment_timesteps(4) == [999, 749, 499, 249]
    assert schedules.segment_timesteps(3) == [999, 665, 332]
    assert schedules.segment_timesteps(1) == [999]
    assert [schedules.segment_edge(t, 4) for t in (999, 750, 749, 259, 249, 19)] == [750, 750, 500, 250, 0, 0]
    ms = schedules.DiscreteSchedule()
    sig = schedules.sigmas_from_timesteps(ms, [999, 800, 759, 499])
    assert sig.tolist()[:4] == pytest.approx([14.6146, 5.1110, 4.2606, 1.6129], abs=2e-4)
    assert sig[-1] == 0


def test_partial_denoise_keeps_the_tail_of_the_longer_grid():
    assert schedules.hypersd_timesteps(2, "trailing", denoise=0.5) == [499, 249]
    assert schedules.hypersd_timesteps(4, "tcd", denoise=1.0) == [999, 759, 499, 259]
    assert schedules.hypersd_timesteps(2, "tcd", denoise=0.5) == [499, 259]
    assert schedules.one_step_timestep(800, 1.0) == 800 and schedules.one_step_timestep(800, 0.5) == 400


@pytest.mark.parametrize("bad", [
    lambda: schedules.hypersd_timesteps(0, "trailing"),
    lambda: schedules.hypersd_timesteps(4, "nope"),
    lambda: schedules.hypersd_timesteps(4, "tcd", denoise=0.0),
    lambda: schedules.hypersd_timesteps(4, "tcd", denoise=1.5),
    lambda: schedules.tcd_timesteps(51),
    lambda: schedules.one_step_timestep(1000),
    lambda: schedules.one_step_timestep(800, 0),
])
def test_schedules_reject_bad_input_with_a_message(bad):
    with pytest.raises(ValueError) as e:
        bad()
    assert len(str(e.value)) > 20


class EpsFn:
    """A fixed nonlinear eps prediction eps(x_vp, t), shared by both implementations."""

    def __init__(self, shape, seed=0):
        g = torch.Generator().manual_seed(seed)
        c = shape[1]
        self.w = torch.randn(c, c, generator=g, dtype=torch.float64) * 0.3
        self.b = torch.randn(shape, generator=g, dtype=torch.float64) * 0.2

    def __call__(self, x_vp, t):
        t = float(t)
        h = torch.einsum("oc,bchw->bohw", self.w, x_vp.double())
        return (torch.tanh(h) * (1 + t / 1000) + self.b * math.cos(t / 300) + 0.5 * x_vp.double()).float()


def run_ours(eps_fn, x_T_vp, steps, eta, seed):
    ms = schedules.DiscreteSchedule()
    sigmas = schedules.hypersd_sigmas(ms, steps, "tcd")
    x = x_T_vp * torch.sqrt(1.0 + sigmas[0] ** 2)  # VP unit noise -> VE (KSAMPLER's max_denoise scaling)

    def model(x, sigma):
        s = sigma[0]
        t = ms.timestep(s)
        ab = 1.0 / (1.0 + s ** 2)
        eps = eps_fn(x * torch.sqrt(ab), t)
        return x - s * eps

    gen = torch.Generator().manual_seed(seed)
    noise = lambda a, b: torch.randn(x.shape, generator=gen)  # noqa: E731
    return samplers.sample_tcd(model, x, sigmas, disable=True, eta=eta, model_sampling=ms, noise_sampler=noise)


def run_diffusers(eps_fn, x_T_vp, steps, eta, seed):
    sched = TCDScheduler(**SD_BETAS)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = x_T_vp.clone()
    for t in sched.timesteps:
        eps = eps_fn(x, t)
        x = sched.step(eps, t, x, eta=eta, generator=gen).prev_sample
    return x / sched.alphas_cumprod[0].sqrt()  # VP -> VE at t = 0


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_tcd_sampler_matches_diffusers(steps, eta):
    shape = (2, 4, 8, 8)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(123))
    eps_fn = EpsFn(shape)
    ours = run_ours(eps_fn, x_T, steps, eta, seed=7)
    ref = run_diffusers(eps_fn, x_T, steps, eta, seed=7)
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, f"steps={steps} eta={eta}: relative difference {rel:.2e}"


def test_tcd_sampler_rejects_bad_eta_and_empty_sigmas():
    ms = schedules.DiscreteSchedule()
    x = torch.zeros(1, 4, 2, 2)
    model = lambda x, s: x  # noqa: E731
    with pytest.raises(ValueError, match="eta"):
        samplers.sample_tcd(model, x, torch.tensor([1.0, 0.0]), eta=1.5, model_sampling=ms)
    with pytest.raises(ValueError, match="at least two sigmas"):
        samplers.sample_tcd(model, x, torch.tensor([]), eta=0.3, model_sampling=ms)
