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


def init_weights_(module: torch.nn.Module, seed: int = 0) -> None:
    """Deterministic initialisation (ComfyUI builds models with uninitialised memory).

    Weights ~ N(0, 1/fan_in), biases 0, normalisation layers weight 1 / bias 0; the UNet's
    final conv gets a small non-zero init so its output depends on the input from the start.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in module.named_modules():
            if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                if mod.weight is not None:
                    mod.weight.fill_(1.0)
                if mod.bias is not None:
                    mod.bias.zero_()
                continue
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.nn.Parameter) and w.dim() > 1:
                fan_in = w[0].numel()
                w.copy_(torch.randn(w.shape, generator=gen) / fan_in ** 0.5)
            b = getattr(mod, "bias", None)
            if isinstance(b, torch.nn.Parameter):
                b.zero_()


def build_sd15_model(unet_config: dict, seed: int = 0):
    """A real SD1.5 ``BaseModel`` (float32, CPU) with deterministic weights."""
    import comfy.supported_models

    model_config = comfy.supported_models.SD15(dict(unet_config))
    model_config.set_inference_dtype(torch.float32, torch.float32)
    model = model_config.get_model({}, device="cpu")
    model.diffusion_model.to(torch.float32)
    init_weights_(model.diffusion_model, seed)
    return model


def wrap_patcher(model):
    import comfy.model_management
    import comfy.model_patcher

    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=dev,
                                            offload_device=comfy.model_management.unet_offload_device())


def tiny_sd15_patcher(model_channels: int = 32, seed: int = 0):
    """A tiny (about 0.3 M parameters at 32 channels) SD1.5-shaped model in a ModelPatcher."""
    return wrap_patcher(build_sd15_model(sd15_unet_config(model_channels), seed=seed))
