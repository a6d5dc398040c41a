"""Hyper-SD file layouts, generated from ComfyUI's own architectures (nothing downloaded).

* ``sd15_config``/``sdxl_config``/``flux_config``: the released model sizes, or smaller
  models of the same layout (``small=True``) that build in a second on the CPU.
* ``build_model(family, config, device)``: a real ``BaseModel`` (``device="meta"`` for the
  full sizes: key names and shapes without memory).
* ``kohya_layout(model)``: the official SD1.5/SDXL Hyper-SD LoRA layout: kohya names
  (``lora_unet_<diffusers path>``) over every attention linear/1x1 projection, every
  ResNet conv, shortcut and time projection, and the down/upsampler convs. At rank 64
  in fp32 this is 269 MB for SD1.5 and 787 MB for SDXL, the released files' sizes.
* ``peft_flux_layout(model)``: PEFT names (``transformer.<diffusers path>``) over the
  linears of every FLUX double and single block.
* ``write_lora``: a LoRA file for a layout, with random values, or sparse (zeros that
  take no disk) for full-size header tests. Writes are atomic (``hypersd_core.files``).
* ``diffusers_unet_state_dict``: a UNet in diffusers key layout (like
  Hyper-SDXL-1step-Unet.safetensors) from a ComfyUI model.
"""
from __future__ import annotations

import json
import struct

import torch

from ComfyUI_HyperSD.hypersd_core import files


def sd15_config(small: bool = False) -> dict:
    cfg = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
           "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
           "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
           "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
           "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
           "use_temporal_attention": False, "use_temporal_resblock": False}
    if small:
        cfg.update(model_channels=32, num_res_blocks=[1, 1], transformer_depth=[1, 0], channel_mult=[1, 2],
                   transformer_depth_output=[1, 1, 0, 0])
    return cfg


def sdxl_config(small: bool = False) -> dict:
    cfg = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
           "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
           "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
           "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
           "use_temporal_attention": False, "use_temporal_resblock": False}
    if small:  # SDXL's layout (no attention at the first level, linear projections) at 64 channels
        cfg.update(model_channels=64, num_res_blocks=[1, 1], transformer_depth=[0, 1], channel_mult=[1, 2],
                   transformer_depth_middle=1, transformer_depth_output=[0, 0, 1, 1])
    return cfg


def flux_config(small: bool = False) -> dict:
    cfg = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
           "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
           "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True, "patch_size": 2}
    if small:
        cfg.update(hidden_size=64, num_heads=2, depth=1, depth_single_blocks=2, axes_dim=[4, 14, 14],
                   context_in_dim=64, vec_in_dim=32)
    return cfg


def build_model(family: str, config: dict, device: str = "cpu", seed: int = 0):
    """A real ComfyUI BaseModel of ``family`` (SD1.5, SDXL, FLUX) in fp32."""
    import comfy.supported_models as sm

    cls = {"SD1.5": sm.SD15, "SDXL": sm.SDXL, "FLUX": sm.Flux}[family]
    mc = cls(dict(config))
    mc.set_inference_dtype(torch.float32, None)
    if device == "meta":
        with torch.device("meta"):
            return mc.get_model({}, device="meta")
    from toy import arch

    model = mc.get_model({}, device="cpu")
    arch.init_weights_(model.diffusion_model, seed)  # ComfyUI's layers skip initialisation
    return model.to(torch.float32)


# ----------------------------------------------------------------------------- layouts
# layout: lora module name -> (model state-dict key, offset or None, weight shape of the slice)

_KOHYA_PARTS = (".attentions.", ".resnets.", ".downsamplers.", ".upsamplers.")


def kohya_layout(model) -> dict:
    import comfy.utils

    sd = model.state_dict()
    mapping = comfy.utils.unet_to_diffusers(model.model_config.unet_config)
    out = {}
    for dk, lk in sorted(mapping.items()):
        if not dk.endswith(".weight") or not any(p in "." + dk for p in _KOHYA_PARTS):
            continue
        key = "diffusion_model." + lk
        w = sd.get(key)
        if w is None or w.dim() not in (2, 4) or "norm" in dk.rsplit(".", 2)[-2]:
            continue
        out["lora_unet_" + dk[: -len(".weight")].replace(".", "_")] = (key, None, tuple(w.shape))
    return out


def peft_flux_layout(model) -> dict:
    import comfy.utils

    sd = model.state_dict()
    cfg = model.model_config.unet_config
    mapping = comfy.utils.flux_to_diffusers(cfg, output_prefix="diffusion_model.")
    out = {}
    for dk, target in sorted(mapping.items()):
        if not dk.endswith(".weight") or not dk.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            continue
        key, offset = (target if isinstance(target, tuple) else (target, None))
        w = sd.get(key)
        if w is None or w.dim() != 2:
            continue
        shape = (offset[2], w.shape[1]) if offset else tuple(w.shape)
        out["transformer." + dk[: -len(".weight")]] = (key, offset, shape)
    return out


def lora_tensor_shapes(layout: dict, rank: int, fmt: str = "kohya") -> dict:
    """Tensor name -> shape for a LoRA of ``layout`` at ``rank`` (kohya or peft names)."""
    shapes = {}
    for mod, (_key, _off, w) in layout.items():
        rest = tuple(w[2:])
        if fmt == "kohya":
            shapes[f"{mod}.lora_down.weight"] = (rank, w[1]) + rest
            shapes[f"{mod}.lora_up.weight"] = (w[0], rank) + (1,) * len(rest)
            shapes[f"{mod}.alpha"] = ()
        else:
            shapes[f"{mod}.lora_A.weight"] = (rank, w[1]) + rest
            shapes[f"{mod}.lora_B.weight"] = (w[0], rank) + (1,) * len(rest)
    return shapes


def lora_state_dict(layout: dict, rank: int = 4, alpha: float | None = 2.0, fmt: str = "kohya", seed: int = 0,
                    scale: float = 0.05, device: str = "cpu") -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in lora_tensor_shapes(layout, rank, fmt).items():
        if name.endswith(".alpha"):
            if alpha is not None:
                out[name] = torch.tensor(float(alpha))
        elif device == "meta":
            out[name] = torch.empty(shape, device="meta")
        else:
            out[name] = (torch.randn(shape, generator=gen) * scale).contiguous()
    return out


def write_lora(path: str, layout: dict, rank: int = 4, alpha: float | None = 2.0, fmt: str = "kohya",
               seed: int = 0, scale: float = 0.05, metadata: dict | None = None) -> str:
    """A LoRA file with random values (atomic write)."""
    files.save_safetensors(path, lora_state_dict(layout, rank, alpha, fmt, seed, scale), metadata=metadata)
    return path


def write_sparse_lora(path: str, layout: dict, rank: int = 64, alpha: float | None = 64.0, fmt: str = "kohya",
                      metadata: dict | None = None) -> int:
    """A full-size fp32 LoRA file whose weights are zeros held as a sparse file (no disk used).

    A valid safetensors file of the released size and layout; only ``.alpha`` values are
    written. Returns the file size in bytes.
    """
    shapes = lora_tensor_shapes(layout, rank, fmt)
    if alpha is None:
        shapes = {k: v for k, v in shapes.items() if not k.endswith(".alpha")}
    order = sorted(shapes, key=lambda k: (not k.endswith(".alpha"), k))
    header, offset = {}, 0
    for k in order:
        n = 4
        for s in shapes[k]:
            n *= s
        header[k] = {"dtype": "F32", "shape": list(shapes[k]), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for k in order:
                if k.endswith(".alpha"):
                    f.write(struct.pack("<f", float(alpha)))
            f.truncate(8 + len(raw) + offset)

    files.atomic_write(path, write)
    return 8 + len(raw) + offset


def diffusers_unet_state_dict(model) -> dict:
    """The model's UNet weights under diffusers names (the layout of Hyper-SDXL-1step-Unet)."""
    import comfy.utils

    sd = model.diffusion_model.state_dict()
    mapping = comfy.utils.unet_to_diffusers(model.model_config.unet_config)
    return {dk: sd[lk].clone() for dk, lk in mapping.items() if lk in sd}
