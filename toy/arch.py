"""Architectures of the toy family, as ComfyUI's loaders detect them.

* ``sd15_unet_config``: a one-level SD1.5-shaped UNet. With ``model_channels=320`` and
  ``context_dim=768`` ComfyUI's model detection recognises it as SD1.5 (about 15-26 M
  parameters); smaller widths can only be built in memory.
* ``tiny_sd15_patcher``: a real ``comfy.model_base.BaseModel`` (eps prediction,
  scaled-linear betas) inside a real ``ModelPatcher`` on the CPU.
"""
from __future__ import annotations

import torch


def sd15_unet_config(model_channels: int = 320, num_res_blocks: int = 1, transformer_depth: int = 1) -> dict:
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": model_channels,
        "num_res_blocks": [num_res_blocks], "transformer_depth": [transformer_depth] * num_res_blocks,
        "channel_mult": [1], "transformer_depth_middle": transformer_depth, "use_linear_in_transformer": False,
        "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
        "transformer_depth_output": [transformer_depth] * (num_res_blocks + 1),
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def build_sd15_model(unet_config: dict, seed: int = 0, init_scale: float | None = None):
    """A real SD1.5 ``BaseModel`` with deterministic weights (torch.manual_seed)."""
    import comfy.supported_models

    model_config = comfy.supported_models.SD15(dict(unet_config))
    model_config.set_inference_dtype(torch.float32, torch.float32)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = model_config.get_model({}, device="cpu")
        if init_scale is not None:
            with torch.no_grad():
                for p in model.diffusion_model.parameters():
                    p.normal_(0, init_scale)
    finally:
        torch.random.set_rng_state(gen_state)
    model.diffusion_model.to(torch.float32)
    return model


def wrap_patcher(model):
    import comfy.model_management
    import comfy.model_patcher

    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=dev,
                                            offload_device=comfy.model_management.unet_offload_device())


def tiny_sd15_patcher(model_channels: int = 32, seed: int = 0):
    """A tiny (about 0.3 M parameters at 32 channels) SD1.5-shaped model in a ModelPatcher.

    The last conv is re-initialised with small random weights (ComfyUI zero-initialises
    it), so the denoiser output depends on its input and samplers can be told apart.
    """
    model = build_sd15_model(sd15_unet_config(model_channels), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return wrap_patcher(model)
