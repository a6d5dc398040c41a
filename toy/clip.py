"""A CLIP-L text encoder generated deterministically (SD1.5's fixed 123 M-parameter layout).

CLIP-L cannot shrink (ComfyUI's ``sd1_clip_config.json`` fixes 12 layers, width 768), so
it is generated at set-up rather than committed. The values come from numpy's PCG64 bit
generator (its raw 64-bit stream is stable across numpy versions), turned into uniform
floats here, so the same seed gives the same bytes on any machine and library version.
Every tensor has its own stream, derived from its name, so the order of generation does
not matter. Layer norms start at weight 1 and bias 0, other biases at 0, weights with
standard deviation 0.02 (uniform on [-0.02*sqrt(3), 0.02*sqrt(3)]).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

VOCAB, WIDTH, LAYERS, FFN, POSITIONS = 49408, 768, 12, 3072, 77


def clip_l_layout(prefix: str = "text_model.") -> dict[str, tuple[int, ...]]:
    """Key -> shape of an SD1.5 CLIP-L text encoder in Hugging Face layout."""
    shapes: dict[str, tuple[int, ...]] = {
        f"{prefix}embeddings.token_embedding.weight": (VOCAB, WIDTH),
        f"{prefix}embeddings.position_embedding.weight": (POSITIONS, WIDTH),
        f"{prefix}final_layer_norm.weight": (WIDTH,),
        f"{prefix}final_layer_norm.bias": (WIDTH,),
    }
    for i in range(LAYERS):
        p = f"{prefix}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (WIDTH, WIDTH)
            shapes[f"{p}self_attn.{proj}.bias"] = (WIDTH,)
        for ln in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}{ln}.weight"] = (WIDTH,)
            shapes[f"{p}{ln}.bias"] = (WIDTH,)
        shapes[f"{p}mlp.fc1.weight"] = (FFN, WIDTH)
        shapes[f"{p}mlp.fc1.bias"] = (FFN,)
        shapes[f"{p}mlp.fc2.weight"] = (WIDTH, FFN)
        shapes[f"{p}mlp.fc2.bias"] = (WIDTH,)
    return shapes


def _uniform(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Uniform [-1, 1) floats from PCG64's raw stream for this tensor name and seed."""
    key = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    raw = np.random.PCG64(key).random_raw(int(np.prod(shape)))
    u = (raw >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))  # [0, 1), 53 bits
    return (u * 2.0 - 1.0).reshape(shape)


def generate_clip_l(seed: int = 0, prefix: str = "text_model.", dtype=torch.float16) -> dict[str, torch.Tensor]:
    """The state dict of the deterministic CLIP-L (about 246 MB in fp16)."""
    out = {}
    std = 0.02
    for name, shape in clip_l_layout(prefix).items():
        if "layer_norm" in name:
            t = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        elif name.endswith("bias"):
            t = torch.zeros(shape)
        else:
            t = torch.from_numpy(_uniform(name, shape, seed) * (std * np.sqrt(3.0))).float()
        out[name] = t.to(dtype)
    return out


def write_clip_l(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the CLIP-L as a standalone safetensors file (``CLIPLoader``, type stable_diffusion), atomically."""
    from ComfyUI_HyperSD.hypersd_core import files

    return files.save_safetensors(path, generate_clip_l(seed), metadata={"hypersd_toy": "clip_l", "seed": str(seed)})
