"""Quality measure of the toy family: a small digits classifier, accuracy and FID.

``measure(images, labels)`` classifies generated digits (accuracy against the prompted
digit) and computes a Fréchet distance between the classifier's 64-dimensional features
of the generated images and of the 500 held-out real digits (``data.split()["test_x"]``).
The classifier weights are committed (``weights/digits_classifier.safetensors``, trained
by ``train_teacher.py``). FID values depend on the number of generated images (small
samples read higher): compare numbers measured with the same count.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS = Path(__file__).resolve().parent / "weights" / "digits_classifier.safetensors"


class DigitsClassifier(nn.Module):
    """``data.SIZE`` grayscale page (1 = white) -> 10 logits; ``features`` gives the 64-d FID features."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1)
        self.c3 = nn.Conv2d(64, 64, 3, padding=1)
        self.c4 = nn.Conv2d(64, 64, 3, padding=1)
        from .data import SIZE

        self.f1 = nn.Linear(64 * (SIZE // 16) ** 2, 64)  # four 2x poolings: 64 -> 4x4
        self.fc = nn.Linear(64, 10)

    def features(self, pages: torch.Tensor) -> torch.Tensor:
        x = (1.0 - pages).unsqueeze(1)  # ink = 1
        for conv in (self.c1, self.c2, self.c3, self.c4):  # 64 -> 32 -> 16 -> 8 -> 4
            x = F.max_pool2d(F.relu(conv(x)), 2)
        return F.relu(self.f1(x.flatten(1)))

    def forward(self, pages: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(pages))


_cache: dict[str, object] = {}


def classifier() -> DigitsClassifier:
    if "clf" not in _cache:
        from safetensors.torch import load_file

        clf = DigitsClassifier()
        clf.load_state_dict(load_file(str(WEIGHTS)))
        clf.eval()
        _cache["clf"] = clf
    return _cache["clf"]


def to_pages(images) -> torch.Tensor:
    """ComfyUI IMAGE ``[N, H, W, C]`` (or ``[N, H, W]``), torch or numpy, uint8 or [0, 1] float,
    or a list of PIL images -> ``[N, SIZE, SIZE]`` float grayscale pages (``data.SIZE``)."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im) for im in images])
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    x = x.float()
    if x.max() > 1.5:
        x = x / 255.0
    if x.dim() == 4:
        x = x[..., :3].mean(-1)
    if x.dim() != 3:
        raise ValueError(f"expected images [N, H, W(, C)], got shape {tuple(x.shape)}")
    from .data import SIZE

    if x.shape[-2:] != (SIZE, SIZE):
        x = F.interpolate(x.unsqueeze(1), size=(SIZE, SIZE), mode="area" if x.shape[-1] > SIZE else "bilinear").squeeze(1)
    return x.clamp(0, 1)


@torch.no_grad()
def features(pages: torch.Tensor) -> np.ndarray:
    clf = classifier()
    return torch.cat([clf.features(pages[i:i + 256]) for i in range(0, len(pages), 256)]).double().numpy()


@torch.no_grad()
def predict(pages: torch.Tensor) -> torch.Tensor:
    clf = classifier()
    return torch.cat([clf(pages[i:i + 256]).argmax(1) for i in range(0, len(pages), 256)])


def frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance of two feature sets (Gaussian fit), as in FID."""
    import warnings

    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    eps = np.eye(f1.shape[1]) * 1e-6  # dead ReLU features make the covariances singular
    s1, s2 = np.cov(f1, rowvar=False) + eps, np.cov(f2, rowvar=False) + eps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def reference_features() -> np.ndarray:
    if "ref" not in _cache:
        from . import data

        _cache["ref"] = features(data.split()["test_x"])
    return _cache["ref"]


def measure(images, labels) -> dict:
    """``{"accuracy", "fid", "n"}`` for generated digit images and the digits they were prompted with."""
    pages = to_pages(images)
    labels = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
    if len(labels) != len(pages):
        raise ValueError(f"{len(pages)} images but {len(labels)} labels")
    acc = float((predict(pages) == labels).float().mean())
    fid = frechet(features(pages), reference_features()) if len(pages) >= 2 else float("nan")
    return {"accuracy": acc, "fid": fid, "n": len(pages)}
