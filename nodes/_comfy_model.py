"""What the pack reads off a ComfyUI model: its family, noise schedule and LoRA key names."""
from __future__ import annotations

import torch

import comfy.lora
import comfy.model_sampling
import comfy.utils
import folder_paths

from ..hypersd_core import metadata
from ..hypersd_core.files import FileSaveError


def model_family(model) -> str:
    """The family of a ``ModelPatcher``'s model (SD1.5, SDXL, SD2, FLUX, ...), as the pack's files name it."""
    return metadata.model_family(getattr(getattr(model, "model", None), "model_config", None))


def key_prefix_map(model) -> dict[str, str]:
    """diffusion_model module path -> kohya key prefix, as ComfyUI's loader maps it back.

    Diffusers-style names (``lora_unet_down_blocks_0_attentions_0_proj_in``, the layout of
    the released Hyper-SD LoRAs) where ComfyUI knows them; the others fall back to
    ComfyUI's own path (``hypersd_core.lora_train.kohya_prefix``).
    """
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    out = {}
    try:
        diffusers = comfy.utils.unet_to_diffusers(model.model_config.unet_config)
    except Exception:  # not a UNet with a diffusers layout
        diffusers = {}
    for dk, ck in diffusers.items():
        if dk.endswith(".weight") and ck.endswith(".weight"):
            pre = "lora_unet_" + dk[: -len(".weight")].replace(".", "_")
            if key_map.get(pre) == f"diffusion_model.{ck}":
                out[ck[: -len(".weight")]] = pre
    return out


def discrete_alphas_cumprod(model_sampling) -> torch.Tensor:
    """The model's 1000 alpha-bars; refuses models outside the discrete eps/v family."""
    ok = isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete) and isinstance(
        model_sampling, (comfy.model_sampling.EPS, comfy.model_sampling.V_PREDICTION)) and not isinstance(
        model_sampling, comfy.model_sampling.CONST)
    if not ok or getattr(model_sampling, "sigmas", None) is None:
        raise ValueError("TSCD distillation here supports discrete-time eps or v-prediction models "
                         "(SD1.x, SD2.x, SDXL and their fine-tunes); this model uses "
                         f"{type(model_sampling).__name__}")
    sig = model_sampling.sigmas.detach().float().cpu()
    return 1.0 / (1.0 + sig ** 2)


def loras_dir() -> str:
    """The first ``loras`` folder: where trained LoRAs go, so every LoRA loader lists them."""
    paths = folder_paths.get_folder_paths("loras")
    if not paths:
        raise FileSaveError("ComfyUI has no 'loras' folder configured")
    return paths[0]
