"""Reward models for human feedback learning (Hyper-SD part 2), in plain torch.

A reward scores decoded images, higher is better, with gradient::

    r = reward(images, labels)      # images [B, 3, H, W] in [0, 1]; labels [B] class indices
                                    # (or None for a reward that ignores the prompt) -> [B]

The feedback loss (:mod:`.feedback`) turns each reward ``d`` into a hinge with its own
margin ``alpha_d`` (Hyper-SD eq. 7, ImageReward's ReFL)::

    L_aes = sum_d  w_d * mean( ReLU(alpha_d - r_d(x0, c)) )

so a picture that already scores ``alpha_d`` or more gives no gradient and the reward is
not over-optimised. A reward may also have a ``supervised_loss(images, labels)``: the loss
it was trained with against a real image's label (the structure term of the paper, which
used an instance-segmentation model's loss; here a classifier's cross-entropy).

Rewards here:

* :class:`ClassifierReward`: ``log p(label | image)`` of a small image classifier
  (:class:`ConvClassifier`), saved as safetensors with its architecture in the metadata
  (:func:`save_classifier`, :func:`load_reward`). The toy's reward is one, trained for
  this purpose (``toy/train_reward.py``) and different from the classifier that judges
  the toy's quality: training against the judge would inflate the judge's numbers
  without better digits.

Files are read with ``safetensors`` only (no pickle); everything a file must hold is
checked, and a file that is not a reward gets an error that says what to use.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

KIND = "hypersd.reward"  # metadata key: the kind of reward a file holds
CLASSIFIER = "classifier"
ARCH_KEYS = ("channels", "size", "in_channels", "classes", "invert")


class Reward(Protocol):
    """``reward(images, labels) -> [B]``: higher is better, differentiable in ``images``."""

    name: str
    needs_labels: bool

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor: ...


def hinge(reward: torch.Tensor, margin: float) -> torch.Tensor:
    """``ReLU(margin - reward)`` per image (Hyper-SD eq. 7): zero, and no gradient, once an
    image scores ``margin`` or more."""
    return F.relu(float(margin) - reward)


# ---------------------------------------------------------------------- classifier rewards


class ConvClassifier(nn.Module):
    """A small image classifier: strided 3x3 convolutions with GroupNorm and SiLU, global
    average pooling, one linear layer.

    ``channels``: the width of each stride-2 stage (e.g. ``(24, 48, 96)``); ``size``: the
    square input the images are resized to; ``in_channels``: 1 (images are averaged to
    grey) or 3; ``invert``: feed ``1 - image`` (dark ink on white pages becomes 1 = ink)."""

    def __init__(self, channels: Sequence[int], size: int, in_channels: int, classes: int, invert: bool = False):
        super().__init__()
        if not channels or any(int(c) < 1 for c in channels):
            raise ValueError(f"classifier channels must be positive widths, got {list(channels)}")
        if int(in_channels) not in (1, 3):
            raise ValueError(f"classifier in_channels must be 1 or 3, got {in_channels}")
        if int(classes) < 2 or int(size) < 2 ** len(channels):
            raise ValueError(f"classifier needs at least 2 classes and size >= 2^stages, got {classes}, {size}")
        self.channels, self.size = [int(c) for c in channels], int(size)
        self.in_channels, self.classes, self.invert = int(in_channels), int(classes), bool(invert)
        layers, prev = [], self.in_channels
        for c in self.channels:
            layers += [nn.Conv2d(prev, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.SiLU()]
            prev = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(prev, self.classes)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` (or ``[B, 1, H, W]``) in [0, 1] -> the network's input, differentiably."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [B, 3, H, W] or [B, 1, H, W], got {tuple(images.shape)}")
        x = images.float()
        if self.in_channels == 1:
            x = x.mean(1, keepdim=True)
        elif x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.size)
        return 1.0 - x if self.invert else x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.body(self.prepare(images))
        return self.head(h.mean(dim=(2, 3)))

    def arch(self) -> dict[str, str]:
        return {"channels": ",".join(str(c) for c in self.channels), "size": str(self.size),
                "in_channels": str(self.in_channels), "classes": str(self.classes), "invert": str(int(self.invert))}


class ClassifierReward(nn.Module):
    """``log p(label | image)`` of a :class:`ConvClassifier` (at most 0; 0 = certain).

    ``class_names``: the name of each class (a digit, a word), for the messages and for
    mapping prompts to labels. ``supervised_loss`` is the classifier's cross-entropy."""

    needs_labels = True

    def __init__(self, classifier: ConvClassifier, class_names: Sequence[str], name: str = "classifier"):
        super().__init__()
        if len(class_names) != classifier.classes:
            raise ValueError(f"{len(class_names)} class names for a classifier of {classifier.classes} classes")
        self.classifier = classifier
        self.class_names = [str(c) for c in class_names]
        self.name = name
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def _check(self, labels) -> torch.Tensor:
        if labels is None:
            raise ValueError(f"the reward {self.name!r} scores an image against its class: give each prompt's "
                             f"class (one of {', '.join(self.class_names)})")
        labels = torch.as_tensor(labels).long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.classifier.classes):
            raise ValueError(f"class index out of range for the reward {self.name!r} "
                             f"({self.classifier.classes} classes: {', '.join(self.class_names)})")
        return labels

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        labels = self._check(labels).to(images.device)
        logp = F.log_softmax(self.classifier(images).float(), dim=-1)
        return logp.gather(1, labels.view(-1, 1)).squeeze(1)

    def supervised_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The classifier's training loss against real labels: mean cross-entropy."""
        return -self.forward(images, labels).mean()

    def label_of(self, text: str) -> int:
        """The class a prompt names: the class name that occurs in it as a word (exactly one)."""
        words = set(re_words(text))
        found = [i for i, c in enumerate(self.class_names) if c.lower() in words]
        if len(found) != 1:
            raise ValueError(f"cannot tell the class of the prompt {text!r} for the reward {self.name!r}: "
                             f"it should name exactly one of {', '.join(self.class_names)}")
        return found[0]


def re_words(text: str) -> list[str]:
    import re

    return re.findall(r"[\w']+", str(text).lower())


# ---------------------------------------------------------------------- files


@dataclass(frozen=True)
class RewardInfo:
    kind: str
    name: str
    detail: str


def save_classifier(path, classifier: ConvClassifier, class_names: Sequence[str], extra: Mapping[str, str] = ()):
    """Write ``classifier`` as a reward file (fp16 weights, architecture in the metadata), atomically."""
    from . import files as fileio

    meta = {KIND: CLASSIFIER, "hypersd.reward_class_names": ",".join(str(c) for c in class_names)}
    meta.update({f"hypersd.reward_{k}": v for k, v in classifier.arch().items()})
    meta.update({str(k): str(v) for k, v in dict(extra).items()})
    sd = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in classifier.state_dict().items()}
    fileio.save_safetensors(Path(path), sd, meta)


def load_reward(path, device=None) -> ClassifierReward:
    """The reward in ``path`` (a safetensors file this pack wrote), out of inference mode so that
    gradients flow through it even when the caller runs under ``torch.inference_mode`` (as
    ComfyUI runs every node)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            with torch.inference_mode(False):
                sd = {k: f.get_tensor(k).float().clone() for k in f.keys()}
    except FileNotFoundError:
        raise ValueError(f"reward file {path} does not exist") from None
    except Exception as e:
        raise ValueError(f"{path.name} is not a readable safetensors file ({e}); a reward for Hyper-SD feedback "
                         f"is a .safetensors file made by this pack (e.g. the toy's hypersd_toy_reward)") from None
    kind = meta.get(KIND)
    if kind != CLASSIFIER:
        raise ValueError(f"{path.name} is not a Hyper-SD reward file (its metadata has no '{KIND}: {CLASSIFIER}'); "
                         f"it may be a LoRA or a checkpoint: put reward models in the hypersd_rewards folder")
    try:
        arch = {k: meta[f"hypersd.reward_{k}"] for k in ARCH_KEYS}
        names = meta["hypersd.reward_class_names"].split(",")
        with torch.inference_mode(False):  # normal tensors: the feedback loss backpropagates through them
            clf = ConvClassifier([int(c) for c in arch["channels"].split(",")], int(arch["size"]),
                                 int(arch["in_channels"]), int(arch["classes"]), invert=arch["invert"] == "1")
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path.name}: the reward's architecture metadata is incomplete or invalid ({e}); "
                         f"save it again with hypersd_core.rewards.save_classifier") from None
    with torch.inference_mode(False):
        try:
            clf.load_state_dict(sd)
        except RuntimeError as e:
            first = str(e).splitlines()[0] if str(e) else "mismatch"
            raise ValueError(f"{path.name}: the weights do not fit the architecture in its metadata ({first})") from None
        reward = ClassifierReward(clf, names, name=path.stem)
        if device is not None:
            reward.to(device)
    if not all(math.isfinite(float(p.abs().max())) for p in reward.parameters()):
        raise ValueError(f"{path.name}: the reward's weights are not finite")
    return reward
