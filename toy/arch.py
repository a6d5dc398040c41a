"""Architectures of the toy family, as ComfyUI's loaders detect them.

* ``sd15_unet_config``: a one-level SD1.5-shaped UNet. With ``model_channels=320`` and
  ``context_dim=768`` ComfyUI's model detection recognises it as SD1.5 (about 15-26 M
  parameters); smaller widths can only be built in memory.
* ``tiny_sd15_patcher``: a real ``comfy.model_base.BaseModel`` (eps prediction,
  scaled-linear betas) inside a real ``ModelPatcher`` on the CPU; ``tiny_sdxl_patcher`` the same
  for SDXL (``comfy.model_base.SDXL``: pooled text and size conditioning).
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


def sdxl_unet_config(model_channels: int = 64) -> dict:
    """A one-level SDXL-shaped UNet: 2048-wide text context, the pooled-text and size embedding
    (``adm_in_channels`` 2816), linear transformer projections, 64-channel heads (SDXL's). Built in
    memory only (ComfyUI detects SDXL files by the full depth)."""
    return dict(sd15_unet_config(model_channels), context_dim=2048, adm_in_channels=2816, num_classes="sequential",
                use_linear_in_transformer=True, num_heads=-1, num_head_channels=64)


def init_weights_(module: torch.nn.Module, seed: int = 0, scheme: str = "scaled_normal",
                  zero: tuple[str, ...] = ()) -> None:
    """Give every parameter of ``module`` a defined value (ComfyUI builds layers on uninitialised memory).

    * ``scaled_normal``: weights ~ N(0, 1/fan_in) from a generator seeded with ``seed`` (the
      global random state is neither used nor changed), biases 0;
    * ``torch_default``: PyTorch's own initialisation of every linear and convolution layer
      (Kaiming-uniform weights and uniform biases, as a freshly built ``torch.nn`` layer has),
      drawn from the global random state, which the caller seeds.

    In both, normalisation layers get weight (or scale) 1 and bias 0, other parameters
    (a TAESD's ``vae_scale``, ...) keep the values their module gave them, and the parameters
    whose names end with one of ``zero`` are set to 0 last (output layers that start silent).
    """
    if scheme not in ("scaled_normal", "torch_default"):
        raise ValueError(f"unknown initialisation {scheme!r}: use 'scaled_normal' or 'torch_default'")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            is_norm = "Norm" in type(mod).__name__
            if scheme == "torch_default" and not is_norm:
                for base in (torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Linear):
                    if isinstance(mod, base):
                        base.reset_parameters(mod)
                        break
                continue
            for name, p in mod.named_parameters(recurse=False):
                if is_norm:
                    p.fill_(1.0 if name in ("weight", "scale") else 0.0)
                elif name == "weight" and p.dim() > 1:
                    p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
                elif name == "bias":
                    p.zero_()
        for name, p in module.named_parameters():
            if any(name.endswith(s) for s in zero):
                p.zero_()


def build_sd15_model(unet_config: dict, seed: int = 0, family: str = "SD15"):
    """A real SD1.5 ``BaseModel`` (float32, CPU) with deterministic weights (``family="SDXL"``: an
    SDXL one, from :func:`sdxl_unet_config`)."""
    import comfy.supported_models

    model_config = getattr(comfy.supported_models, family)(dict(unet_config))
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


def tiny_sdxl_patcher(model_channels: int = 64, seed: int = 0):
    """A tiny (about 2 M parameters at 64 channels) SDXL-shaped model in a ModelPatcher: it takes
    conditioning with a ``pooled_output`` of 1280 as SDXL does."""
    return wrap_patcher(build_sd15_model(sdxl_unet_config(model_channels), seed=seed, family="SDXL"))
