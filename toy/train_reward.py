#!/usr/bin/env python3
"""Train the toy's reward model for feedback learning: a digits classifier that is NOT the judge.

Feedback learning pushes the LoRA towards pictures a reward model scores high. If that
model were the judge of ``quality.py`` (whose accuracy and FID features measure the toy's
quality), the numbers would measure how well the LoRA fools the judge, not better digits.
So the reward is another model in every way the judge allows:

* another architecture: ``hypersd_core.rewards.ConvClassifier`` (strided convolutions,
  GroupNorm, SiLU, global average pooling; the judge is max-pooled ReLU convolutions with a
  64-unit feature layer);
* other training pages: the training digits at other seeded sizes and positions
  (``data.training_pages(copies, seed=REWARD_PAGE_SEED)``); the held-out 500 are never seen;
* augmentation the judge had not: random blur, contrast, ink gain, shifts and pixel noise,
  so that it scores the soft, noisy pictures a few-step generator makes;
* another seed.

It is saved as ``toy/weights/hypersd_toy_reward.safetensors`` (fp16, a reward file with its
architecture in the metadata, :func:`hypersd_core.rewards.save_classifier`); set-up copies it
into the host's ``models/hypersd_rewards``. Run with the host's Python from the repository
root (about 4 minutes on one core)::

    OMP_NUM_THREADS=1 .venv/bin/python -m toy.train_reward
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import hypersd_dev  # noqa: F401  (puts the host and this pack on the path)
from ComfyUI_HyperSD.hypersd_core import rewards
from ComfyUI_HyperSD.hypersd_core.train import learning_rate_at

from . import data

WEIGHTS = Path(__file__).resolve().parent / "weights"
REWARD_FILE = "hypersd_toy_reward.safetensors"
REWARD_PAGE_SEED = 500  # the pages' sizes and positions (the UNet: 0; the judge: 100 + its seed)
CHANNELS = (16, 32, 64)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Pages ``[B, 64, 64]`` (1 = white) -> randomly blurred, shifted, faded and noised pages."""
    B = x.shape[0]
    ink = 1.0 - x
    # shifts of up to 4 pixels (the page is mostly white: rolling moves ink, not borders)
    dy, dx = (torch.randint(-4, 5, (2,), generator=gen)).tolist()
    ink = torch.roll(ink, shifts=(dy, dx), dims=(1, 2))
    # blur on half of the pages (a 3x3 box, once or twice)
    blur = torch.rand(B, generator=gen) < 0.5
    if blur.any():
        soft = F.avg_pool2d(ink[blur].unsqueeze(1), 3, 1, 1)
        if bool(torch.rand(1, generator=gen) < 0.5):
            soft = F.avg_pool2d(soft, 3, 1, 1)
        ink[blur] = soft.squeeze(1)
    # ink gain (faded or heavy strokes) and a grey background
    gain = 0.6 + 0.6 * torch.rand(B, 1, 1, generator=gen)
    ink = (ink * gain).clamp(0, 1)
    page = 1.0 - ink
    page = page - 0.15 * torch.rand(B, 1, 1, generator=gen) * page  # background from white to light grey
    noise = 0.08 * torch.rand(B, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return (page + noise).clamp(0, 1)


def train(seed: int, steps: int, batch: int, copies: int, lr: float) -> tuple[rewards.ConvClassifier, dict]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = data.training_pages(copies, seed=REWARD_PAGE_SEED)
    clf = rewards.ConvClassifier(CHANNELS, size=data.SIZE, in_channels=1, classes=10, invert=True)
    opt = torch.optim.AdamW(clf.parameters(), lr, weight_decay=1e-4)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = learning_rate_at(lr, "cosine", step, steps, warmup=50)
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        xb = augment(x[idx], gen).unsqueeze(1)
        loss = F.cross_entropy(clf(xb), y[idx], label_smoothing=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    split = data.split()
    with torch.no_grad():
        held = split["test_x"].unsqueeze(1)
        acc = float((clf(held).argmax(1) == split["test_y"]).float().mean())
        acc_aug = float((clf(augment(split["test_x"], torch.Generator().manual_seed(1)).unsqueeze(1)).argmax(1)
                         == split["test_y"]).float().mean())
    return clf, {"seed": seed, "steps": steps, "batch": batch, "copies": copies, "lr": lr,
                 "heldout_accuracy": round(acc, 4), "heldout_accuracy_augmented": round(acc_aug, 4),
                 "minutes": round((time.time() - t0) / 60, 1), "parameters": sum(p.numel() for p in clf.parameters())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", type=Path, default=WEIGHTS / REWARD_FILE)
    args = ap.parse_args()
    torch.set_num_threads(1)
    clf, info = train(args.seed, args.steps, args.batch, args.copies, args.lr)
    rewards.save_classifier(args.out, clf, [str(d) for d in range(10)],
                            {"hypersd.reward_about": "the toy's reward for feedback learning (toy/train_reward.py); "
                                                     "not the judge of toy/quality.py",
                             "hypersd.reward_heldout_accuracy": str(info["heldout_accuracy"])})
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
