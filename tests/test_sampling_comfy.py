"""The TCD sampler and schedules on a real model inside a real ModelPatcher (in-process)."""
from __future__ import annotations

import pytest
import torch


def _cond(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 768, generator=g), {}]]


def _sample(tiny_model, sampler, sigmas, seed=0, latent=None, mask=None, record=None):
    import comfy.sample

    latent = torch.zeros(1, 4, 8, 8) if latent is None else latent
    noise = comfy.sample.prepare_noise(latent, seed)
    cb = None
    if record is not None:
        cb = lambda i, x0, x, total: record.append((i, x0.clone(), x.clone()))  # noqa: E731
    return comfy.sample.sample_custom(tiny_model, noise, 1.0, sampler, sigmas, _cond(), _cond(), latent,
                                      noise_mask=mask, callback=cb, disable_pbar=True, seed=seed)


@pytest.fixture(scope="module")
def nodes_sampling(pack):
    from ComfyUI_HyperSD.nodes import sampling

    return sampling


def _sigmas(tiny_model, steps, mode="tcd", denoise=1.0):
    from ComfyUI_HyperSD.hypersd_core import schedules

    return schedules.hypersd_sigmas(tiny_model.get_model_object("model_sampling"), steps, mode, denoise)


def test_eta0_is_euler_on_a_real_model(tiny_model, nodes_sampling):
    import comfy.samplers

    euler = comfy.samplers.sampler_object("euler")
    tcd0 = nodes_sampling.tcd_sampler(0.0)
    # Up to a nonzero last sigma, the two are the same DDIM steps.
    sig = _sigmas(tiny_model, 4)[:-1]
    a, b = _sample(tiny_model, tcd0, sig), _sample(tiny_model, euler, sig)
    # The same arithmetic in another order: equal to 1e-5 on the CPU; CUDA's kernels round
    # differently (3e-5 of the latent's scale on an H200), so there relative to that scale.
    on_gpu = tiny_model.load_device.type != "cpu"
    atol = 1e-4 * float(b.abs().max()) if on_gpu else 1e-5
    assert torch.allclose(a, b, rtol=1e-5, atol=atol), (a - b).abs().max()
    # To sigma 0, TCD (like diffusers) lands on x0 + sigma(0) * eps instead of x0.
    sig = _sigmas(tiny_model, 4)
    rec = []
    a, b = _sample(tiny_model, tcd0, sig, record=rec), _sample(tiny_model, euler, sig)
    _, x0_last, x_last = rec[-1]
    ms = tiny_model.get_model_object("model_sampling")
    eps = (x_last - x0_last) / sig[-2]
    scale = tiny_model.model.latent_format.scale_factor
    expected = (x0_last + ms.sigma(torch.tensor([0.0])) * eps) / scale
    assert torch.allclose(a, expected, atol=1e-5)
    assert torch.allclose(b, x0_last / scale, atol=1e-5)
    assert not torch.allclose(a, b, atol=1e-4)


def test_eta1_is_lcm_to_within_sigma0(tiny_model, nodes_sampling):
    import comfy.samplers

    sig = _sigmas(tiny_model, 4)
    a = _sample(tiny_model, nodes_sampling.tcd_sampler(1.0), sig, seed=5)
    b = _sample(tiny_model, comfy.samplers.sampler_object("lcm"), sig, seed=5)
    rel = ((a - b).norm() / b.norm()).item()
    assert 0 < rel < 0.05, rel  # the sigma(0) * eps that diffusers' TCD keeps (HYPERSD.md: about 3%)


def test_seed_reproduces_and_differs(tiny_model, nodes_sampling):
    s = nodes_sampling.tcd_sampler(0.3)
    sig = _sigmas(tiny_model, 4)
    a, b, c = _sample(tiny_model, s, sig, seed=1), _sample(tiny_model, s, sig, seed=1), _sample(tiny_model, s, sig, seed=2)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 1e-3


def test_partial_denoise_and_inpaint_mask(tiny_model, nodes_sampling):
    s = nodes_sampling.tcd_sampler(0.3)
    g = torch.Generator().manual_seed(3)
    latent = torch.randn(1, 4, 8, 8, generator=g)
    # img2img: a short tail of the schedule stays near the input latent; the full one does not.
    near = _sample(tiny_model, s, _sigmas(tiny_model, 2, denoise=0.1), latent=latent)
    far = _sample(tiny_model, s, _sigmas(tiny_model, 2, denoise=1.0), latent=latent)
    assert (near - latent).norm() / latent.norm() < 0.5 * ((far - latent).norm() / latent.norm())
    # inpainting: mask 0 keeps the input exactly, mask 1 is resampled
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, 4:] = 1.0
    out = _sample(tiny_model, s, _sigmas(tiny_model, 4), latent=latent, mask=mask)
    kept = (out[..., :4] - latent[..., :4]).abs().max().item()
    changed = (out[..., 4:] - latent[..., 4:]).abs().mean().item()
    assert kept < 1e-4 and changed > 0.5, (kept, changed)


def test_schedulers_registered_in_ksampler_lists(pack, tiny_model):
    import comfy.samplers

    assert comfy.samplers.KSAMPLER_NAMES.count("tcd") == 1
    assert comfy.samplers.KSampler.SAMPLERS.count("tcd") == 1
    for name in ("hypersd_tcd", "hypersd_trailing"):
        assert comfy.samplers.KSampler.SCHEDULERS.count(name) == 1
    pack.nodes.on_load()  # a second registration changes nothing
    from ComfyUI_HyperSD.nodes import sampling

    sampling.register()
    assert comfy.samplers.KSAMPLER_NAMES.count("tcd") == 1
    assert comfy.samplers.KSampler.SCHEDULERS.count("hypersd_tcd") == 1
    ms = tiny_model.get_model_object("model_sampling")
    ts = ms.timestep(comfy.samplers.calculate_sigmas(ms, "hypersd_tcd", 4)[:-1]).tolist()
    assert ts == [999, 759, 499, 259]
    ts = ms.timestep(comfy.samplers.calculate_sigmas(ms, "hypersd_trailing", 8)[:-1]).tolist()
    assert ts == [999, 874, 749, 624, 499, 374, 249, 124]
