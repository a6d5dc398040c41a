"""Every shipped example workflow, in API format, with the note shown beside it.

``python -m scripts.build_example_workflows`` lays each out as a UI-format file in
``example_workflows/`` (what artists open); ``tests/test_example_workflows.py`` converts
every file back and checks it still equals its graph here, and the server tests run them
with tiny models and LoRAs of the official layout, named as the official files.

Three groups: the few-step sampling recipes with core loaders and this pack's sampler and
scheduler nodes (issue 3), the Hyper-SD LoRA/UNet loader recipes (issue 4), and distilling
your own checkpoint with the TSCD trainer (issue 6).
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
    return _decode(g, "6", "hypersd_sd15_unified_tcd_nodes")


def sd15_unified_ksampler() -> dict:
    g = _lora(_base(SD15_CKPT, "a photo of a cat sitting on a windowsill, soft light", 512), "Hyper-SD15-1step-lora.safetensors")
    g["6"] = {"class_type": "KSampler", "inputs": {
        "model": ["2", 0], "seed": 42, "steps": 4, "cfg": 1.0, "sampler_name": "tcd", "scheduler": "hypersd_tcd",
        "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}}
    return _decode(g, "6", "hypersd_sd15_unified_ksampler")


def sdxl_onestep_checkpoint() -> dict:
    g = _base(SDXL_ONESTEP_CKPT, "a photo of a cat sitting on a windowsill, soft light", 1024)
    g["10"] = {"class_type": "HyperSDTCDSampler", "inputs": {"eta": 1.0}}
    g["11"] = {"class_type": "HyperSDOneStepScheduler", "inputs": {"model": ["1", 0], "timestep": 800, "denoise": 1.0}}
    g["6"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["1", 0], "add_noise": True, "noise_seed": 42, "cfg": 1.0, "positive": ["3", 0], "negative": ["4", 0],
        "sampler": ["10", 0], "sigmas": ["11", 0], "latent_image": ["5", 0]}}
    return _decode(g, "6", "hypersd_sdxl_onestep_checkpoint")



SAMPLING_NOTES = {
    "hypersd_sd15_8step_lora_ksampler": (
        "## Hyper-SD15 8-step LoRA with the stock KSampler\n\nNeeds `Hyper-SD15-8steps-lora.safetensors` in "
        "`models/loras` and an SD1.5 checkpoint (`v1-5-pruned-emaonly.safetensors`). N-step LoRAs want DDIM with trailing timesteps: sampler `ddim`, "
        "scheduler `hypersd_trailing` (added by this pack; `sgm_uniform` is close), steps = the LoRA's (2/4/8), cfg 1."),
    "hypersd_sd15_unified_tcd_nodes": (
        "## Hyper-SD15 unified (1-step) LoRA at 1-8 steps with TCD\n\nNeeds `Hyper-SD15-1step-lora.safetensors` and an "
        "SD1.5 checkpoint (`v1-5-pruned-emaonly.safetensors`). "
        "Hyper-SD TCD Sampler + Hyper-SD Scheduler (mode `tcd`), cfg 1. eta 1.0 for one step, about 0.3 for 2-8 "
        "steps; lower eta = more detail, higher = smoother. A fixed seed gives the same picture."),
    "hypersd_sd15_unified_ksampler": (
        "## The unified LoRA in the simplest graph\n\nNeeds `Hyper-SD15-1step-lora.safetensors` in `models/loras` and "
        "an SD1.5 checkpoint (`v1-5-pruned-emaonly.safetensors`). The stock KSampler with sampler `tcd` (eta 0.3) and "
        "scheduler `hypersd_tcd`, both added by this pack. For another eta use the Hyper-SD TCD Sampler node."),
    "hypersd_sdxl_onestep_checkpoint": (
        "## Hyper-SDXL one-step checkpoint\n\nNeeds `Hyper-SDXL-1step-Unet-Comfyui.fp16.safetensors` (the whole ComfyUI "
        "checkpoint) in `models/checkpoints`. One step from timestep 800 (Hyper-SD One-Step Scheduler), TCD eta 1, cfg 1. "
        "The diffusers-format `Hyper-SDXL-1step-Unet.safetensors` is a UNet only: see the workflow "
        "'11 - SDXL one-step UNet (diffusers file)'."),
}

SAMPLING = {
    "hypersd_sd15_8step_lora_ksampler": sd15_nstep_ksampler,
    "hypersd_sd15_unified_tcd_nodes": sd15_unified_tcd,
    "hypersd_sd15_unified_ksampler": sd15_unified_ksampler,
    "hypersd_sdxl_onestep_checkpoint": sdxl_onestep_checkpoint,
}

# ----------------------------------------------------------------------------- the LoRA loader recipes

def _sd_graph(base_ckpt: str, lora: str, size: int, positive: str, negative: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": base_ckpt}},
        "2": {"class_type": "HyperSDLoraLoader", "inputs": {"model": ["1", 0], "lora_name": lora, "strength": -1.0,
                                                              "steps": 0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "SamplerCustom", "inputs": {
            "model": ["2", 0], "add_noise": True, "noise_seed": 42, "cfg": ["2", 2], "positive": ["3", 0],
            "negative": ["4", 0], "sampler": ["2", 4], "sigmas": ["2", 5], "latent_image": ["5", 0]}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "HyperSD"}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["2", 6]}},
    }


PROMPT = "a photo of a red fox in the snow, detailed fur, soft light"
NEG = "blurry, low quality, deformed"

LOADER = {
    "hypersd_sd15_nstep_lora": dict(
        graph=_sd_graph("v1-5-pruned-emaonly.safetensors", "Hyper-SD15-8steps-lora.safetensors", 512, PROMPT, ""),
        note="Hyper-SD15 N-step LoRA. Expects models/checkpoints/v1-5-pruned-emaonly.safetensors and "
             "models/loras/Hyper-SD15-8steps-lora.safetensors (or the 2/4-step files: the loader reads the "
             "step count from the file). DDIM with the trailing schedule, cfg 1: the negative prompt has no effect."),
    "hypersd_sd15_unified_tcd": dict(
        graph=_sd_graph("v1-5-pruned-emaonly.safetensors", "Hyper-SD15-1step-lora.safetensors", 512, PROMPT, ""),
        note="Hyper-SD15 unified LoRA with TCD. Expects models/checkpoints/v1-5-pruned-emaonly.safetensors (or any SD1.5 "
             "checkpoint) and models/loras/Hyper-SD15-1step-lora.safetensors. "
             "One step with eta 1.0; set the loader's steps to 2-8 for more detail (eta drops to 0.3)."),
    "hypersd_sd15_cfg_lora": dict(
        graph=_sd_graph("v1-5-pruned-emaonly.safetensors", "Hyper-SD15-8steps-CFG-lora.safetensors", 512, PROMPT, NEG),
        note="Hyper-SD15 CFG LoRA: classifier-free guidance works (cfg 5 from the loader) and the negative prompt "
             "counts. Expects models/checkpoints/v1-5-pruned-emaonly.safetensors (or any SD1.5 checkpoint) and "
             "models/loras/Hyper-SD15-8steps-CFG-lora.safetensors (or the 12-step file)."),
    "hypersd_sdxl_nstep_lora": dict(
        graph=_sd_graph("sd_xl_base_1.0.safetensors", "Hyper-SDXL-4steps-lora.safetensors", 1024, PROMPT, ""),
        note="Hyper-SDXL N-step LoRA. Expects models/checkpoints/sd_xl_base_1.0.safetensors and "
             "models/loras/Hyper-SDXL-4steps-lora.safetensors (2/4/8-step files all work)."),
    "hypersd_sdxl_unified_tcd": dict(
        graph=_sd_graph("sd_xl_base_1.0.safetensors", "Hyper-SDXL-1step-lora.safetensors", 1024, PROMPT, ""),
        note="Hyper-SDXL unified LoRA with TCD. Expects models/checkpoints/sd_xl_base_1.0.safetensors (or any SDXL "
             "checkpoint) and models/loras/Hyper-SDXL-1step-lora.safetensors."),
    "hypersd_sdxl_cfg_lora": dict(
        graph=_sd_graph("sd_xl_base_1.0.safetensors", "Hyper-SDXL-12steps-CFG-lora.safetensors", 1024, PROMPT, NEG),
        note="Hyper-SDXL CFG LoRA with a negative prompt (cfg 5). Expects models/checkpoints/sd_xl_base_1.0.safetensors "
             "and models/loras/Hyper-SDXL-12steps-CFG-lora.safetensors (or the 8-step file)."),
    "hypersd_sdxl_onestep_unet": dict(
        graph={
            "1": {"class_type": "HyperSDUNetLoader", "inputs": {"unet_name": "Hyper-SDXL-1step-Unet.safetensors",
                                                                  "timestep": 800}},
            "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["2", 1]}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
            "6": {"class_type": "SamplerCustom", "inputs": {
                "model": ["1", 0], "add_noise": True, "noise_seed": 42, "cfg": ["1", 2], "positive": ["3", 0],
                "negative": ["3", 0], "sampler": ["1", 3], "sigmas": ["1", 4], "latent_image": ["5", 0]}},
            "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["2", 2]}},
            "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "HyperSD"}},
        },
        note="Hyper-SDXL one-step UNet (diffusers format). Put Hyper-SDXL-1step-Unet.safetensors in "
             "models/diffusion_models (NOT checkpoints: 'Load Checkpoint' cannot read it). CLIP and VAE come from "
             "sd_xl_base_1.0.safetensors. One LCM step from timestep 800. For the ComfyUI single-file version "
             "(Hyper-SDXL-1step-Unet-Comfyui.fp16.safetensors) use 'Load Checkpoint' + 'Hyper-SD One-Step Scheduler'."),
    "hypersd_flux_lora": dict(
        graph={
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
            "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                             "clip_name2": "t5xxl_fp16.safetensors", "type": "flux",
                                                             "device": "default"}},
            "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
            "4": {"class_type": "HyperSDLoraLoader", "inputs": {"model": ["1", 0],
                                                                  "lora_name": "Hyper-FLUX.1-dev-8steps-lora.safetensors",
                                                                  "strength": -1.0, "steps": 0}},
            "5": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["2", 0]}},
            "6": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["5", 0], "guidance": 3.5}},
            "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
            "8": {"class_type": "SamplerCustom", "inputs": {
                "model": ["4", 0], "add_noise": True, "noise_seed": 42, "cfg": ["4", 2], "positive": ["6", 0],
                "negative": ["6", 0], "sampler": ["4", 4], "sigmas": ["4", 5], "latent_image": ["7", 0]}},
            "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
            "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "HyperSD"}},
            "11": {"class_type": "PreviewAny", "inputs": {"source": ["4", 6]}},
        },
        note="Hyper-FLUX.1-dev 8-step LoRA. Expects models/diffusion_models/flux1-dev.safetensors, "
             "models/text_encoders/clip_l.safetensors + t5xxl_fp16.safetensors, models/vae/ae.safetensors and "
             "models/loras/Hyper-FLUX.1-dev-8steps-lora.safetensors (16-step file works too). Strength is automatic "
             "(0.125); guidance 3.5 via FluxGuidance, cfg 1."),
}


# ----------------------------------------------------------------------------- distilling your own checkpoint

TRAIN_FOLDER = "my_training_images"  # a folder of ComfyUI's input/ with images and one caption .txt per image


def sd15_train_tscd() -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_CKPT}},
        "2": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": TRAIN_FOLDER}},
        "3": {"class_type": "MakeTrainingDataset", "inputs": {"images": ["2", 0], "texts": ["2", 1], "vae": ["1", 2],
                                                               "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "HyperSDTrainTSCD", "inputs": {
            "model": ["1", 0], "latents": ["3", 0], "positive": ["3", 1], "negative": ["4", 0], "stages": "8,4,2,1",
            "steps_per_stage": 250, "learning_rate": 1e-4, "rank": 16, "teacher_cfg": 7.0, "seed": 0,
            "output_name": "my_model_hypersd", "checkpoint_every": 100, "batch_size": 4, "resume": True,
            "loss": "huber", "lora_scope": "transformer", "ema_decay": 0.95, "gradient_checkpointing": False,
            "lr_schedule": "constant", "save_stages": True, "score_steps": 0, "generator_t": 999, "fake_updates": 5,
            "regression_weight": 0.25, "score_tscd_weight": 1.0, "score_feedback_weight": 0.0}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat sitting on a windowsill, soft light",
                                                          "clip": ["1", 1]}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "10": {"class_type": "KSampler", "inputs": {
            "model": ["5", 0], "seed": 42, "steps": 4, "cfg": 1.0, "sampler_name": "tcd", "scheduler": "hypersd_tcd",
            "positive": ["6", 0], "negative": ["4", 0], "latent_image": ["7", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "hypersd_trained"}},
    }


def sd15_train_unified() -> dict:
    """The TSCD example, then score distillation on the same student: one unified LoRA, tried at 1 step."""
    g = sd15_train_tscd()
    g["5"]["inputs"].update(output_name="my_model_hypersd_unified", score_steps=500)
    g["10"]["inputs"].update(steps=1)
    g["9"]["inputs"].update(filename_prefix="hypersd_unified")
    return g


TOY_CKPT = "hypersd_toy_digits.safetensors"
TOY_DATASET = "hypersd_toy_digits_train"  # set-up writes it into input/ (toy.data.write_dataset)
TOY_K4_LORA = "hypersd_toy_tscd_lora_stage2_k4.safetensors"
TOY_REWARD = "hypersd_toy_reward.safetensors"


def toy_train_feedback() -> dict:
    """Human feedback learning on the toy: the toy reward steers a feedback LoRA on the 4-step LoRA."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TOY_CKPT}},
        "2": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": TOY_DATASET}},
        "3": {"class_type": "MakeTrainingDataset", "inputs": {"images": ["2", 0], "texts": ["2", 1], "vae": ["1", 2],
                                                               "clip": ["1", 1]}},
        "4": {"class_type": "HyperSDRewardLoader", "inputs": {"reward_name": TOY_REWARD, "margin": -0.05,
                                                               "weight": 1.0}},
        "5": {"class_type": "HyperSDTrainFeedback", "inputs": {
            "model": ["1", 0], "lora_name": TOY_K4_LORA, "vae": ["1", 2], "rewards": ["4", 0], "latents": ["3", 0],
            "positive": ["3", 1], "captions": ["2", 1], "steps_of_lora": "4", "steps": 200, "learning_rate": 1e-4,
            "rank": 8, "merge_ratio": 1.0, "eta": 0.0, "structure_weight": 0.5, "seed": 0, "batch_size": 16,
            "output_name": "my_toy_feedback", "checkpoint_every": 50, "resume": True, "lora_scope": "all",
            "gradient_checkpointing": False, "scored_steps": "late half", "anchor_weight": 0.0,
            "eta_of_lora": False}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a handwritten digit 7", "clip": ["1", 1]}},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 4}},
        "10": {"class_type": "KSampler", "inputs": {
            "model": ["5", 0], "seed": 42, "steps": 4, "cfg": 1.0, "sampler_name": "ddim", "scheduler": "hypersd_trailing",
            "positive": ["6", 0], "negative": ["11", 0], "latent_image": ["7", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "hypersd_feedback"}},
    }


TRAINING = {
    "hypersd_sd15_train_tscd": dict(
        graph=sd15_train_tscd(),
        note=("## Distil your own SD1.5 checkpoint into Hyper-SD LoRAs (TSCD)\n\nNeeds an SD1.5 checkpoint "
              f"(`{SD15_CKPT}`, or your fine-tune) and a folder `input/{TRAIN_FOLDER}` with your images and one "
              "caption `.txt` per image (same name). Stages 8,4,2,1 train one after another; the LoRAs land in "
              "`models/loras`: `my_model_hypersd_stage1_k8`, `_stage2_k4`, `_stage3_k2` (8-, 4-, 2-step LoRAs: "
              "TCD eta 0.3 on the trailing grid, cfg 1; the Hyper-SD LoRA Loader hands it out) and `my_model_hypersd` (the unified one: TCD at 1-8 steps, cfg 1), which the "
              "KSampler here tries at once. Progress shows on the node; Cancel keeps a checkpoint and queueing "
              "again resumes it. Out of memory: turn on gradient_checkpointing, or lower batch_size.")),
    "hypersd_sd15_train_unified": dict(
        graph=sd15_train_unified(),
        note=("## TSCD, then score distillation: one unified LoRA for 1 to 8 steps\n\nNeeds what the TSCD "
              f"example needs (`{SD15_CKPT}` or your fine-tune, and `input/{TRAIN_FOLDER}`). It is that example with "
              "`score_steps` 500: after the stages 8,4,2,1 the same LoRA learns to draw in one step by "
              "distribution matching against your checkpoint (a fake score trained alongside as a second adapter "
              "on the same model, `fake_updates` per step; `regression_weight` keeps it near the teacher's 25-step "
              "pictures; `score_tscd_weight` keeps the TSCD term beside it, so 2 to 8 steps stay good). "
              "`my_model_hypersd_unified` recommends TCD, cfg 1 (eta 1 up to 4 steps, 0.6 at 8: the Hyper-SD LoRA "
              "Loader hands out the eta for the steps you choose); the TSCD result before score distillation is "
              "kept as `my_model_hypersd_unified_stage4_k1`. The KSampler tries it at one step. A score-distillation "
              "step costs several TSCD steps (its fake-score updates and the TSCD term; see the README's cost row).")),
}


TRAINING["hypersd_toy_train_feedback"] = dict(
    graph=toy_train_feedback(),
    note=("## Human feedback learning: a reward model steers a few-step LoRA\n\nRuns as is on the toy family "
          f"that the pack's set-up installs: `{TOY_CKPT}` (handwritten digits, SD1.5 format), its 4-step LoRA "
          f"`{TOY_K4_LORA}`, the toy reward `{TOY_REWARD}` (a digits classifier in `models/hypersd_rewards`, not the "
          f"one that judges the toy's quality) and 500 captioned digits in `input/{TOY_DATASET}`. The feedback "
          "LoRA trains on top of the 4-step LoRA (frozen): the LoRA's own 4 steps to a late step, the picture "
          "predicted in one step and decoded, a hinge on the reward (log-probability of the prompted digit, "
          "margin -0.05); `structure_weight` adds the reward's own loss on real digits. The reward reads each "
          "picture's class from `captions`. It saves `my_toy_feedback` (the 4-step LoRA with the feedback merged "
          "at `merge_ratio`: the 4-step LoRA's own recipe, 4 steps, cfg 1) and `my_toy_feedback_feedback` (the "
          "feedback alone, to merge at another ratio). With your own checkpoint: your N-step Hyper-SD LoRA, "
          "your images with captions, and a reward model file."))

TOY_UNIFIED_LORA = "hypersd_toy_tscd_lora.safetensors"


def toy_rate_images() -> dict:
    """Draw with the toy's unified LoRA at 4 steps and rate the pictures in the page."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TOY_CKPT}},
        "2": {"class_type": "HyperSDLoraLoader", "inputs": {"model": ["1", 0], "lora_name": TOY_UNIFIED_LORA,
                                                            "strength": -1.0, "steps": 4}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a handwritten digit 7", "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 8}},
        "6": {"class_type": "SamplerCustom", "inputs": {
            "model": ["2", 0], "add_noise": True, "noise_seed": 42, "cfg": 1.0, "positive": ["3", 0],
            "negative": ["4", 0], "sampler": ["2", 4], "sigmas": ["2", 5], "latent_image": ["5", 0]}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "HyperSDRateImages", "inputs": {"images": ["7", 0], "filename_prefix": "hypersd_rated",
                                                            "prompt_text": ""}},
    }


def toy_train_preference() -> dict:
    """Your ratings -> a preference reward -> a feedback LoRA on the unified LoRA, tried at 4 steps."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TOY_CKPT}},
        "2": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": TOY_DATASET}},
        "3": {"class_type": "MakeTrainingDataset", "inputs": {"images": ["2", 0], "texts": ["2", 1], "vae": ["1", 2],
                                                               "clip": ["1", 1]}},
        "4": {"class_type": "HyperSDTrainPreferenceReward", "inputs": {
            "features_from": TOY_REWARD, "output_name": "my_preference", "margin": 2.0, "weight": 1.0,
            "holdout": 0.2, "steps": 400, "learning_rate": 0.05, "seed": 0, "prompt_contains": ""}},
        "5": {"class_type": "HyperSDTrainFeedback", "inputs": {
            "model": ["1", 0], "lora_name": TOY_UNIFIED_LORA, "vae": ["1", 2], "rewards": ["4", 0],
            "latents": ["3", 0], "positive": ["3", 1], "steps_of_lora": "4", "steps": 40, "learning_rate": 3e-4,
            "rank": 8, "merge_ratio": 1.0, "eta": 1.0, "structure_weight": 0.0, "seed": 0, "batch_size": 16,
            "output_name": "my_preference_feedback", "checkpoint_every": 20, "resume": True, "lora_scope": "all",
            "gradient_checkpointing": False, "scored_steps": "late half", "anchor_weight": 0.0,
            "eta_of_lora": False}},
        "6": {"class_type": "HyperSDLoraLoader", "inputs": {"model": ["1", 0], "lora_name": TOY_UNIFIED_LORA,
                                                            "strength": -1.0, "steps": 4}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "a handwritten digit 7", "clip": ["1", 1]}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 4}},
        "10": {"class_type": "SamplerCustom", "inputs": {
            "model": ["5", 0], "add_noise": True, "noise_seed": 42, "cfg": 1.0, "positive": ["7", 0],
            "negative": ["8", 0], "sampler": ["6", 4], "sigmas": ["6", 5], "latent_image": ["9", 0]}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "hypersd_preference"}},
    }


TRAINING["hypersd_toy_rate_images"] = dict(
    graph=toy_rate_images(),
    note=("## Rate pictures: your own human feedback\n\nRuns as is on the toy family that set-up installs "
          f"(`{TOY_CKPT}` and its unified LoRA `{TOY_UNIFIED_LORA}`). 'Hyper-SD Rate Images' saves the pictures and "
          "shows Like / Dislike under each and a 'Prefer A over B' choice; every click is stored (with the prompt, "
          "seed, checkpoint, LoRAs and sampler settings the graph used) in ComfyUI's user folder, "
          "`hypersd/ratings.sqlite3`. Change the seed or the prompt and rate more: likes and dislikes are compared "
          "within one prompt, a 'prefer' click counts as it is. About ten pairs are the least a preference reward "
          "trains on; a hundred make a good one. `GET /hypersd/ratings/export?format=csv` downloads them."))
TRAINING["hypersd_toy_train_preference"] = dict(
    graph=toy_train_preference(),
    note=("## Your taste as a reward, then a LoRA that follows it\n\nRuns on the toy family that set-up installs "
          f"(`{TOY_CKPT}`) after rating pictures (the rating example): "
          "'Hyper-SD Train Preference Reward' fits a Bradley-Terry head on frozen image features (on the toy: "
          f"the toy reward's `{TOY_REWARD}`; on SD models connect CLIP ViT-L/14 and pick clip_vision), tells how "
          "often it agrees with your held-out pairs, saves `models/hypersd_rewards/my_preference.safetensors` "
          f"and hands it to 'Hyper-SD Train Feedback LoRA', which trains on the unified LoRA `{TOY_UNIFIED_LORA}` "
          f"at 4 steps (TCD, eta 1) with the toy's captioned digits `input/{TOY_DATASET}`. The margin is in "
          "standard deviations over your rated pictures: 2 pushes towards pictures like your best-rated ones and "
          "no further. The result, `my_preference_feedback`, keeps the unified LoRA's recipe."))

WORKFLOWS = {name: {"graph": make(), "note": SAMPLING_NOTES[name]} for name, make in SAMPLING.items()}
WORKFLOWS.update(LOADER)
WORKFLOWS.update(TRAINING)

# The template browser's card of each workflow: an ordered, readable title (also its file name:
# file_stem) and one sentence (locales/<lang>/main.json "templateWorkflows", made by
# scripts/build_locales.py); the number orders the cards from the simplest recipe to training.
TEMPLATES = {
    "hypersd_sd15_unified_ksampler": ("01 · SD1.5 unified LoRA, plain KSampler",
                                      "The 1-step LoRA in the simplest graph: KSampler with the tcd sampler."),
    "hypersd_sd15_unified_tcd_nodes": ("02 · SD1.5 unified LoRA, 1-8 steps with TCD",
                                       "Hyper-SD TCD Sampler and Scheduler: one LoRA for 1 to 8 steps."),
    "hypersd_sd15_unified_tcd": ("03 · SD1.5 unified LoRA, settings from the loader",
                                 "Hyper-SD LoRA Loader hands the sampler, sigmas and cfg to SamplerCustom."),
    "hypersd_sd15_8step_lora_ksampler": ("04 · SD1.5 8-step LoRA, plain KSampler",
                                         "An N-step LoRA with DDIM on the trailing schedule."),
    "hypersd_sd15_nstep_lora": ("05 · SD1.5 N-step LoRA, settings from the loader",
                                "The loader reads the file and gives its steps, sampler and schedule."),
    "hypersd_sd15_cfg_lora": ("06 · SD1.5 CFG LoRA with a negative prompt",
                              "A CFG-preserving LoRA: guidance at cfg 5 and the negative prompt work."),
    "hypersd_sdxl_unified_tcd": ("07 · SDXL unified LoRA with TCD", "The SDXL 1-step LoRA at 1 to 8 steps."),
    "hypersd_sdxl_nstep_lora": ("08 · SDXL N-step LoRA", "The SDXL 4-step LoRA with its recipe from the loader."),
    "hypersd_sdxl_cfg_lora": ("09 · SDXL CFG LoRA with a negative prompt", "The SDXL 12-step CFG LoRA at cfg 5."),
    "hypersd_sdxl_onestep_checkpoint": ("10 · SDXL one-step checkpoint",
                                        "The one-step checkpoint: one LCM step from timestep 800."),
    "hypersd_sdxl_onestep_unet": ("11 · SDXL one-step UNet (diffusers file)",
                                  "The diffusers one-step UNet through Hyper-SD UNet Loader, CLIP and VAE from SDXL."),
    "hypersd_flux_lora": ("12 · FLUX.1-dev 8-step LoRA", "The FLUX LoRA at strength 0.125 with guidance 3.5."),
    "hypersd_sd15_train_tscd": ("13 · Train: distil your SD1.5 checkpoint (TSCD)",
                                "Progressive TSCD stages 8, 4, 2, 1: an 8-, 4-, 2-step and a final LoRA."),
    "hypersd_sd15_train_unified": ("14 · Train: TSCD then score distillation (unified)",
                                   "One unified LoRA for 1 to 8 steps from your checkpoint."),
    "hypersd_toy_train_feedback": ("15 · Train: human feedback learning (toy)",
                                   "A reward model steers a 4-step LoRA; runs as is on the toy model."),
    "hypersd_toy_rate_images": ("16 · Rate pictures (toy)", "Like, dislike and prefer: your ratings, stored."),
    "hypersd_toy_train_preference": ("17 · Train: your ratings as a reward (toy)",
                                     "A preference reward from your ratings, then a LoRA that follows it."),
}



def file_stem(key: str) -> str:
    """The workflow's file name without ``.json``: its card title, made a file name every system
    takes ("13 · Train: distil ..." -> "13 - Train - distil ..."). Both front ends title a pack's
    template card with the file name (1.32.9 and 1.58.1 alike, seen in the page), so the file
    name is the title a newcomer reads."""
    return TEMPLATES[key][0].replace(" · ", " - ").replace(": ", " - ")


FILES = {key: file_stem(key) for key in TEMPLATES}  # key -> the file's name in example_workflows/
assert all(not set(stem) & set('<>:"/\\|?*') for stem in FILES.values()), FILES


def example_path(key: str, suffix: str = ".json"):
    """``example_workflows/<its file name><suffix>`` of the workflow ``key``."""
    from hypersd_dev import REPO

    return REPO / "example_workflows" / f"{FILES[key]}{suffix}"


def stale_files(suffix: str) -> list:
    """The files of ``example_workflows/`` ending in ``suffix`` that no workflow has any more (one
    renamed or removed here): what the builders remove after writing."""
    from hypersd_dev import REPO

    wanted = {f"{stem}{suffix}" for stem in FILES.values()}
    return [p for p in sorted((REPO / "example_workflows").glob(f"*{suffix}")) if p.name not in wanted]


# Where the official files a workflow names come from (the front end offers the download of a
# missing model from its node's "models" property).
_HF = "https://huggingface.co"
MODEL_FILES = {
    "v1-5-pruned-emaonly.safetensors": ("checkpoints",
                                        f"{_HF}/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/v1-5-pruned-emaonly.safetensors"),
    "sd_xl_base_1.0.safetensors": ("checkpoints",
                                   f"{_HF}/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors"),
    "Hyper-SDXL-1step-Unet-Comfyui.fp16.safetensors": ("checkpoints",
                                                       f"{_HF}/ByteDance/Hyper-SD/resolve/main/Hyper-SDXL-1step-Unet-Comfyui.fp16.safetensors"),
    "Hyper-SDXL-1step-Unet.safetensors": ("diffusion_models",
                                          f"{_HF}/ByteDance/Hyper-SD/resolve/main/Hyper-SDXL-1step-Unet.safetensors"),
    "flux1-dev.safetensors": ("diffusion_models",
                              f"{_HF}/black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors"),
    "ae.safetensors": ("vae", f"{_HF}/black-forest-labs/FLUX.1-dev/resolve/main/ae.safetensors"),
    "clip_l.safetensors": ("text_encoders", f"{_HF}/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors"),
    "t5xxl_fp16.safetensors": ("text_encoders",
                               f"{_HF}/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"),
    **{name: ("loras", f"{_HF}/ByteDance/Hyper-SD/resolve/main/{name}") for name in (
        "Hyper-SD15-8steps-lora.safetensors", "Hyper-SD15-1step-lora.safetensors",
        "Hyper-SD15-8steps-CFG-lora.safetensors", "Hyper-SDXL-4steps-lora.safetensors",
        "Hyper-SDXL-1step-lora.safetensors", "Hyper-SDXL-12steps-CFG-lora.safetensors",
        "Hyper-FLUX.1-dev-8steps-lora.safetensors")},
}
