"""Exact merge of two kohya-layout LoRAs into one file, by concatenating ranks.

A kohya LoRA layer holds ``down`` (``[r, in]`` or ``[r, in, kh, kw]``), ``up`` (``[out, r]`` or
``[out, r, 1, 1]``) and ``alpha``; it adds ``(alpha / r) * up @ down`` to the weight. Two
layers at strengths ``s1`` and ``s2`` add::

    s1 (a1/r1) B1 A1 + s2 (a2/r2) B2 A2  =  [B1 | B2] @ [c1 A1 ; c2 A2],   c_i = s_i a_i / r_i

which is one layer of rank ``r1 + r2`` with ``alpha = r1 + r2`` (scale 1): exact, not an
approximation (peft's ``add_weighted_adapter(..., combination_type="cat")``). A layer that
only one file has keeps its own rank, with its strength folded in the same way. This is how
a feedback LoRA is merged with the few-step LoRA it was trained on, at the chosen ratio.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"


def layers(sd: Mapping[str, torch.Tensor], what: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{prefix: (down, up, alpha)}``; refuses files that are not kohya LoRAs."""
    out, unknown = {}, []
    for key in sd:
        if key.endswith(DOWN):
            pre = key[: -len(DOWN)]
            up = sd.get(pre + UP)
            if up is None:
                raise ValueError(f"{what}: layer {pre} has lora_down but no lora_up")
            down = sd[key]
            rank = down.shape[0]
            if up.shape[1] != rank:
                raise ValueError(f"{what}: layer {pre} has rank {rank} in lora_down but {up.shape[1]} in lora_up")
            alpha = sd.get(pre + ALPHA)
            out[pre] = (down, up, float(alpha) if alpha is not None else float(rank))
        elif not (key.endswith(UP) or key.endswith(ALPHA)):
            unknown.append(key)
    if unknown:
        raise ValueError(f"{what}: keys that are not kohya LoRA weights ({len(unknown)}, e.g. {unknown[0]}); only "
                         f"kohya-layout LoRAs (lora_down/lora_up/alpha), such as this pack's, can be merged exactly")
    if not out:
        raise ValueError(f"{what}: no LoRA layers found")
    return out


def merge_cat(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor], s1: float = 1.0,
              s2: float = 1.0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``first`` at strength ``s1`` plus ``second`` at ``s2`` as one kohya LoRA (see the module)."""
    a, b = layers(first, "first LoRA"), layers(second, "second LoRA")
    out: dict[str, torch.Tensor] = {}
    for pre in sorted(set(a) | set(b)):
        parts = [(lay, s) for lay, s in ((a.get(pre), float(s1)), (b.get(pre), float(s2))) if lay is not None]
        downs, ups = [], []
        for (down, up, alpha), s in parts:
            c = s * alpha / down.shape[0]
            downs.append(down.float() * c)
            ups.append(up.float())
        if len(parts) == 2 and (downs[0].shape[1:] != downs[1].shape[1:] or ups[0].shape[0] != ups[1].shape[0]
                                or ups[0].shape[2:] != ups[1].shape[2:]):
            raise ValueError(f"layer {pre} has different shapes in the two LoRAs "
                             f"({tuple(downs[0].shape)} / {tuple(ups[0].shape)} against "
                             f"{tuple(downs[1].shape)} / {tuple(ups[1].shape)}): they belong to different models")
        down = torch.cat(downs, dim=0)
        out[pre + DOWN] = down.to(dtype).contiguous()
        out[pre + UP] = torch.cat(ups, dim=1).to(dtype).contiguous()
        out[pre + ALPHA] = torch.tensor(float(down.shape[0]), dtype=dtype)
    return out


def delta(sd: Mapping[str, torch.Tensor], prefix: str, strength: float = 1.0) -> torch.Tensor:
    """The weight update ``strength * (alpha / r) * up @ down`` of one layer (for checks)."""
    down, up, alpha = layers({k: v for k, v in sd.items() if k.startswith(prefix + ".")}, "LoRA")[prefix]
    d = up.float().flatten(1) @ down.float().flatten(1)
    return strength * alpha / down.shape[0] * d
