"""Training data of a run: latents grouped by shape and prompt, drawn reproducibly.

Latents come as ComfyUI gives them (a ``LATENT`` dict ``{"samples": tensor}``, a list of
them, or bare tensors; nested tensors are split), prompts as any conditioning structure
(compared by value). Groups are put in a canonical order (by content), so the order a
folder is listed in does not change the trained LoRA.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch


class LatentData:
    """Training latents in groups of equal shape, each with its condition.

    ``sample`` draws a group (in proportion to its size) and a batch from it, with the
    step's generator, so a run is reproducible and resumable from the step number alone.
    """

    def __init__(self, groups: Sequence[tuple[torch.Tensor, Any]]):
        self.groups = [(g, c) for g, c in groups if g.shape[0] > 0]
        if not self.groups:
            raise ValueError("no training latents")
        self.sizes = torch.tensor([g.shape[0] for g, _ in self.groups], dtype=torch.float64)

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def sample(self, batch_size: int, generator: torch.Generator, device, dtype=torch.float32) -> tuple[torch.Tensor, Any]:
        gi = int(torch.multinomial(self.sizes, 1, generator=generator)) if len(self.groups) > 1 else 0
        lat, cond = self.groups[gi]
        n = lat.shape[0]
        if batch_size <= n:
            idx = torch.randperm(n, generator=generator)[:batch_size]
        else:
            idx = torch.randint(0, n, (batch_size,), generator=generator)
        return lat[idx].to(device, dtype), cond


def latent_groups(latents) -> list[torch.Tensor]:
    """LATENT input (one dict, or a list of dicts or tensors) -> tensors grouped by shape."""
    items = latents if isinstance(latents, (list, tuple)) else [latents]
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for item in items:
        s = item["samples"] if isinstance(item, dict) else item
        parts = list(s.unbind()) if getattr(s, "is_nested", False) else [s]
        for p in parts:
            if p.dim() == 3:
                p = p.unsqueeze(0)
            if p.dim() != 4:
                raise ValueError(f"training latents must be image latents (B, C, H, W); got shape {tuple(p.shape)}")
            by_shape.setdefault(tuple(p.shape[1:]), []).append(p.detach().float().cpu())
    groups = [torch.cat(v, 0) for v in by_shape.values()]
    if not groups or sum(g.shape[0] for g in groups) == 0:
        raise ValueError("no training latents: connect a LATENT (e.g. VAE Encode of your images)")
    return groups


def digest(obj, h=None):
    """sha256 over the values of a tensor / conditioning structure (for a canonical order)."""
    h = h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        t = obj.detach().float().cpu().contiguous()
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        h.update(b"[%d" % len(obj))
        for v in obj:
            digest(v, h)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(repr(obj).encode())
    else:  # hooks, ControlNets, ...: identity is all we can compare
        h.update(f"{type(obj).__name__}@{id(obj)}".encode())
    return h


def paired_latent_groups(latents, positives) -> tuple[list[tuple[torch.Tensor, int]], list]:
    """Latents with one positive conditioning each -> ``([(latents, prompt index)], prompts)``.

    ``latents`` is a list of LATENTs and ``positives`` a list of conditionings of the same
    length (what ComfyUI's *Make Training Dataset* gives: one caption per image). Latents
    with equal prompts (compared by value) and equal shapes train together; each training
    batch comes from one such group.
    """
    items = latents if isinstance(latents, (list, tuple)) else [latents]
    if len(items) != len(positives):
        raise ValueError(f"{len(positives)} positive conditionings for {len(items)} latents: connect one positive "
                         f"(used for every latent) or one per latent, in the same order (e.g. the two lists of "
                         f"'Make Training Dataset')")
    prompt_of: dict[str, object] = {}
    members: dict[tuple, list[torch.Tensor]] = {}
    for item, cond in zip(items, positives):
        if not cond:
            raise ValueError("an empty positive conditioning was given for a latent")
        key = digest(cond).hexdigest()
        prompt_of.setdefault(key, cond)
        for g in latent_groups(item):
            members.setdefault((key, tuple(g.shape[1:])), []).extend(g.unbind(0))
    keys = sorted(prompt_of)
    index = {k: i for i, k in enumerate(keys)}
    groups = []
    for (key, shape) in sorted(members, key=lambda ks: (index[ks[0]], ks[1])):
        rows = sorted(members[(key, shape)], key=lambda r: digest(r).hexdigest())
        groups.append((torch.stack(rows, 0), index[key]))
    return groups, [prompt_of[k] for k in keys]
