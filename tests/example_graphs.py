"""The shipped example workflows of few-step sampling, in API format.

``scripts/build_example_workflows.py`` lays each out as a UI-format file in
``example_workflows/`` (what artists open); the tests convert those files back, check
they still equal these graphs, and run them on the server with the toy model and a
LoRA of the same layout in place of the official files named here.
"""
from __future__ import annotations

SD15_CKPT = "v1-5-pruned-emaonly.safetensors"
SDXL_ONESTEP_CKPT = "Hyper-SDXL-1step-Unet-Comfyui.fp16.safetensors"


def _base(ckpt: str, prompt: str, size: int, negative: str = "") -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
    }


def _decode(g: dict, latent_from: str, prefix: str) -> dict:
    g["8"] = {"class_type": "VAEDecode", "inputs": {"samples": [latent_from, 0], "vae": ["1", 2]}}
    g["9"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}}
    return g


def _lora(g: dict, name: str) -> dict:
    g["2"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": name, "strength_model": 1.0}}
    return g


def sd15_nstep_ksampler() -> dict:
    g = _lora(_base(SD15_CKPT, "a photo of a cat sitting on a windowsill, soft light", 512), "Hyper-SD15-8steps-lora.safetensors")
    g["6"] = {"class_type": "KSampler", "inputs": {
        "model": ["2", 0], "seed": 42, "steps": 8, "cfg": 1.0, "sampler_name": "ddim", "scheduler": "hypersd_trailing",
        "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}}
    return _decode(g, "6", "hypersd_sd15_8step")


def sd15_unified_tcd() -> dict:
    g = _lora(_base(SD15_CKPT, "a photo of a cat sitting on a windowsill, soft light", 512), "Hyper-SD15-1step-lora.safetensors")
    g["10"] = {"class_type": "HyperSDTCDSampler", "inputs": {"eta": 0.3}}
    g["11"] = {"class_type": "HyperSDScheduler", "inputs": {"model": ["2", 0], "steps": 4, "mode": "tcd", "denoise": 1.0}}
    g["6"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["2", 0], "add_noise": True, "noise_seed": 42, "cfg": 1.0, "positive": ["3", 0], "negative": ["4", 0],
        "sampler": ["10", 0], "sigmas": ["11", 0], "latent_image": ["5", 0]}}
    return _decode(g, "6", "hypersd_sd15_unified_tcd")


def sd15_unified_ksampler() -> dict:
    g = _lora(_base(SD15_CKPT, "a photo of a cat sitting on a windowsill, soft light", 512), "Hyper-SD15-1step-lora.safetensors")
    g["6"] = {"class_type": "KSampler", "inputs": {
        "model": ["2", 0], "seed": 42, "steps": 4, "cfg": 1.0, "sampler_name": "tcd", "scheduler": "hypersd_tcd",
        "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}}
    return _decode(g, "6", "hypersd_sd15_unified_ksampler")


def sdxl_onestep_unet() -> dict:
    g = _base(SDXL_ONESTEP_CKPT, "a photo of a cat sitting on a windowsill, soft light", 1024)
    g["10"] = {"class_type": "HyperSDTCDSampler", "inputs": {"eta": 1.0}}
    g["11"] = {"class_type": "HyperSDOneStepScheduler", "inputs": {"model": ["1", 0], "timestep": 800, "denoise": 1.0}}
    g["6"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["1", 0], "add_noise": True, "noise_seed": 42, "cfg": 1.0, "positive": ["3", 0], "negative": ["4", 0],
        "sampler": ["10", 0], "sigmas": ["11", 0], "latent_image": ["5", 0]}}
    return _decode(g, "6", "hypersd_sdxl_onestep")


NOTES = {
    "hypersd_sd15_8step_lora_ksampler": (
        "## Hyper-SD15 8-step LoRA with the stock KSampler\n\nNeeds `Hyper-SD15-8steps-lora.safetensors` in "
        "`models/loras` and an SD1.5 checkpoint. N-step LoRAs want DDIM with trailing timesteps: sampler `ddim`, "
        "scheduler `hypersd_trailing` (added by this pack; `sgm_uniform` is close), steps = the LoRA's (2/4/8), cfg 1."),
    "hypersd_sd15_unified_tcd": (
        "## Hyper-SD15 unified (1-step) LoRA at 1-8 steps with TCD\n\nNeeds `Hyper-SD15-1step-lora.safetensors`. "
        "Hyper-SD TCD Sampler + Hyper-SD Scheduler (mode `tcd`), cfg 1. eta 1.0 for one step, about 0.3 for 2-8 "
        "steps; lower eta = more detail, higher = smoother. A fixed seed gives the same picture."),
    "hypersd_sd15_unified_ksampler": (
        "## The unified LoRA in the simplest graph\n\nThe stock KSampler with sampler `tcd` (eta 0.3) and scheduler "
        "`hypersd_tcd`, both added by this pack. For another eta use the Hyper-SD TCD Sampler node."),
    "hypersd_sdxl_onestep_unet": (
        "## Hyper-SDXL one-step UNet\n\nNeeds `Hyper-SDXL-1step-Unet-Comfyui.fp16.safetensors` (the whole ComfyUI "
        "checkpoint) in `models/checkpoints`. One step from timestep 800 (Hyper-SD One-Step Scheduler), TCD eta 1, cfg 1. "
        "The diffusers-format `Hyper-SDXL-1step-Unet.safetensors` is a UNet only: load it with Load Diffusion Model "
        "(UNETLoader) and take CLIP and VAE from an SDXL checkpoint."),
}

WORKFLOWS = {
    "hypersd_sd15_8step_lora_ksampler": sd15_nstep_ksampler,
    "hypersd_sd15_unified_tcd": sd15_unified_tcd,
    "hypersd_sd15_unified_ksampler": sd15_unified_ksampler,
    "hypersd_sdxl_onestep_unet": sdxl_onestep_unet,
}
