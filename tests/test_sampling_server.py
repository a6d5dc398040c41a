"""Few-step sampling through the real server: KSampler with `tcd`, SamplerCustom with our nodes."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from hypersd_dev.server import ExecutionFailed, PromptError


def graph(parts, sampler_part: dict, seed=1, prefix="t"):
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": parts["unet"], "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": parts["clip"], "type": "stable_diffusion"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a handwritten digit 3", "clip": ["2", 0]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }
    g.update(sampler_part(seed))
    g["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}}
    return g


def ksampler(steps=4, sampler="tcd", scheduler="hypersd_tcd", denoise=1.0, latent=("4", 0)):
    return lambda seed: {"5": {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": sampler, "scheduler": scheduler,
        "positive": ["3", 0], "negative": ["3", 0], "latent_image": list(latent), "denoise": denoise}}}


def custom(eta=0.3, steps=4, mode="tcd", denoise=1.0, one_step=False, latent=("4", 0)):
    def part(seed):
        sched = ({"class_type": "HyperSDOneStepScheduler", "inputs": {"model": ["1", 0], "timestep": 800, "denoise": denoise}}
                 if one_step else
                 {"class_type": "HyperSDScheduler", "inputs": {"model": ["1", 0], "steps": steps, "mode": mode, "denoise": denoise}})
        return {
            "6": {"class_type": "HyperSDTCDSampler", "inputs": {"eta": eta}},
            "7": sched,
            "5": {"class_type": "SamplerCustom", "inputs": {
                "model": ["1", 0], "add_noise": True, "noise_seed": seed, "cfg": 1.0, "positive": ["3", 0],
                "negative": ["3", 0], "sampler": ["6", 0], "sigmas": ["7", 0], "latent_image": list(latent)}},
        }
    return part


def advanced(eta=0.3, steps=4, mode="tcd"):
    """SamplerCustomAdvanced: RandomNoise + BasicGuider + our sampler and scheduler."""
    return lambda seed: {
        "6": {"class_type": "HyperSDTCDSampler", "inputs": {"eta": eta}},
        "7": {"class_type": "HyperSDScheduler", "inputs": {"model": ["1", 0], "steps": steps, "mode": mode, "denoise": 1.0}},
        "12": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "13": {"class_type": "BasicGuider", "inputs": {"model": ["1", 0], "conditioning": ["3", 0]}},
        "5": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["12", 0], "guider": ["13", 0], "sampler": ["6", 0], "sigmas": ["7", 0], "latent_image": ["4", 0]}},
    }


def run_latent(server, g) -> torch.Tensor:
    entry = server.run(g)
    (path,) = server.output_files(entry, "9")
    return load_file(str(path))["latent_tensor"]


@pytest.mark.parametrize("part", [ksampler(), custom(), custom(mode="trailing", eta=0.0), custom(one_step=True, eta=1.0),
                                  advanced()],
                         ids=["KSampler-tcd", "SamplerCustom-tcd", "SamplerCustom-trailing", "one-step-800",
                              "SamplerCustomAdvanced-tcd"])
def test_seeded_and_reproducible_through_the_server(server, sd15_parts, part):
    a = run_latent(server, graph(sd15_parts, part, seed=11))
    server.free()
    b = run_latent(server, graph(sd15_parts, part, seed=11))
    c = run_latent(server, graph(sd15_parts, part, seed=12))
    assert a.shape == (1, 4, 8, 8)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b), "one seed must give the same latent twice"
    assert (a - c).abs().mean() > 1e-3, "two seeds must give different latents"


def test_partial_denoise_starts_from_the_given_latent(server, sd15_parts):
    g = graph(sd15_parts, ksampler(steps=4))  # node 5: a first picture
    src = run_latent(server, g)
    g["10"] = {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": 5, "steps": 2, "cfg": 1.0, "sampler_name": "tcd", "scheduler": "hypersd_tcd",
        "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["5", 0], "denoise": 0.1}}
    g["11"] = {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": "img2img"}}
    entry = server.run(g)
    out = load_file(str(server.output_files(entry, "11")[0]))["latent_tensor"]
    full = run_latent(server, graph(sd15_parts, ksampler(steps=4), seed=5))
    near = ((out - src).norm() / src.norm()).item()
    assert near < 0.5 * ((full - src).norm() / src.norm()).item(), near


@pytest.mark.parametrize("node,inputs,what", [
    ("HyperSDScheduler", {"steps": 0, "mode": "tcd", "denoise": 1.0}, "steps"),
    ("HyperSDScheduler", {"steps": 4, "mode": "tcd", "denoise": 0.0}, "denoise"),
    ("HyperSDOneStepScheduler", {"timestep": 1000, "denoise": 1.0}, "timestep"),
])
def test_out_of_range_values_are_rejected_by_the_schema(server, sd15_parts, node, inputs, what):
    g = graph(sd15_parts, custom())
    g["7"] = {"class_type": node, "inputs": dict(inputs, model=["1", 0])}
    with pytest.raises(PromptError) as e:
        server.post_prompt(g)
    assert e.value.status == 400 and what in str(e.value.body)


def test_bad_eta_and_tcd_steps_fail_clearly_and_the_server_keeps_serving(server, sd15_parts):
    g = graph(sd15_parts, custom(eta=1.5))
    with pytest.raises(PromptError) as e:
        server.post_prompt(g)
    assert "eta" in str(e.value.body)
    server.expect_pack_errors = True
    with pytest.raises(ExecutionFailed) as e:
        server.run(graph(sd15_parts, custom(steps=60, mode="tcd")))
    assert "at most 50 steps" in e.value.error["exception_message"]
    # an empty SIGMAS (SplitSigmas past the end) returns the input latent, no crash
    g = graph(sd15_parts, custom())
    g["8"] = {"class_type": "SplitSigmas", "inputs": {"sigmas": ["7", 0], "step": 10}}
    g["5"]["inputs"]["sigmas"] = ["8", 1]
    out = run_latent(server, g)
    assert torch.equal(out, torch.zeros(1, 4, 8, 8))
    # and the next prompt works
    assert torch.isfinite(run_latent(server, graph(sd15_parts, ksampler()))).all()
