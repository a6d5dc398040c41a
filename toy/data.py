"""Handwritten digits for the toy family: scikit-learn's ``load_digits`` rendered at 32x32.

The 1,797 8x8 digits are split once, deterministically and stratified, into a training
part (diffusion model, VAE, classifier) and a held-out part (classifier accuracy and the
reference set of the FID). Images are dark ink on a white page, values in [0, 1],
shape ``[N, 32, 32]`` (grayscale; the VAE sees it repeated on three channels).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 32
HELDOUT_PER_CLASS = 36  # 360 held-out digits in all
PROMPT = "a handwritten digit {}"
PROMPTS = [PROMPT.format(d) for d in range(10)]


def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def render(ink8: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """8x8 ink maps in [0, 1] -> ``[N, size, size]`` pages (1 = white, 0 = black ink)."""
    x = ink8.reshape(-1, 1, 8, 8)
    # pad one pixel of empty page so the digit keeps a margin, then smooth upscaling
    x = F.pad(x, (1, 1, 1, 1))
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return 1.0 - x[:, 0]


def split() -> dict[str, torch.Tensor]:
    """``{"train_x", "train_y", "test_x", "test_y"}``; the same on every run and machine."""
    imgs, labels = _raw_digits()
    test_idx = []
    for c in range(10):
        idx = np.nonzero(labels == c)[0]
        # every k-th sample of a class goes to the held-out part (no RNG involved)
        step = len(idx) / HELDOUT_PER_CLASS
        test_idx.extend(idx[(np.arange(HELDOUT_PER_CLASS) * step).astype(int)])
    test_mask = np.zeros(len(labels), dtype=bool)
    test_mask[np.array(test_idx)] = True
    x = render(torch.from_numpy(imgs))
    y = torch.from_numpy(labels)
    return {"train_x": x[~test_mask], "train_y": y[~test_mask], "test_x": x[test_mask], "test_y": y[test_mask]}


def shifted(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Shift pages by whole pixels, filling with white."""
    out = torch.ones_like(x)
    h, w = x.shape[-2:]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd] = x[..., ys, xs]
    return out


def augmented(x: torch.Tensor, y: torch.Tensor, shift: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """All whole-pixel shifts in [-shift, shift]^2 of every page (deterministic)."""
    xs, ys = [], []
    for dy in range(-shift, shift + 1):
        for dx in range(-shift, shift + 1):
            xs.append(shifted(x, dx, dy))
            ys.append(y)
    return torch.cat(xs), torch.cat(ys)
