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

* :class:`AestheticReward`: the LAION aesthetic predictor (v1 linear head, v2 MLP head; read
  from ``.safetensors`` or weights-only ``.pth``) on a CLIP ViT-L/14 vision model's image
  embedding, resized and normalised with gradient by :func:`clip_pixels`;
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

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled features the last layer classifies, ``[B, channels[-1]]`` (a preference
        reward's frozen features, :mod:`.preference`)."""
        return self.body(self.prepare(images)).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

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


# ---------------------------------------------------------------------- the LAION aesthetic predictor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# the v2 head's Linear layers (768-1024-128-64-16-1, dropout between, no activation) by state-dict index
_V2_LAYERS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")


def clip_pixels(images: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [0, 1] -> a CLIP vision model's input, with gradient: the shorter
    side resized to ``size`` (bicubic, antialiased), the centre cropped, then normalised. (ComfyUI's
    ``clip_preprocess`` also rounds to 8 bits, which has no gradient.)"""
    x = images.float()
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bicubic",
                          align_corners=False, antialias=min(h, w) > size)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top:top + size, left:left + size]
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    sd = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / sd


class AestheticHead(nn.Module):
    """The LAION aesthetic predictor's head on L2-normalised CLIP image embeddings: v1 is one
    ``Linear(d, 1)``; v2 is ``Linear`` layers d-1024-128-64-16-1 (its dropout is off at inference
    and it has no activations, so the layers are applied in turn)."""

    def __init__(self, dims: Sequence[int]):
        super().__init__()
        self.dims = [int(d) for d in dims]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(self.dims, self.dims[1:]))

    @property
    def in_features(self) -> int:
        return self.dims[0]

    @property
    def version(self) -> str:
        return "v1" if len(self.layers) == 1 else "v2"

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        x = embeds
        for layer in self.layers:
            x = layer(x)
        return x


def aesthetic_head(sd: Mapping[str, torch.Tensor], what: str = "the head") -> AestheticHead:
    """An :class:`AestheticHead` from a v1 (``weight``, ``bias``) or v2 (``layers.N.*``) state dict."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if set(sd) == {"weight", "bias"}:
        names = [""]
    elif all(f"{n}.weight" in sd and f"{n}.bias" in sd for n in _V2_LAYERS) and len(sd) == 2 * len(_V2_LAYERS):
        names = [f"{n}." for n in _V2_LAYERS]
    else:
        raise ValueError(f"{what} is not a LAION aesthetic predictor head (v1: weight and bias of one Linear layer; "
                         f"v2: layers.0/2/4/6/7); its keys: {', '.join(sorted(sd)[:6])}")
    weights = [sd[f"{n}weight"] for n in names]
    dims = [int(weights[0].shape[-1])] + [int(w.shape[0]) for w in weights]
    for w, b, a, o in zip(weights, [sd[f"{n}bias"] for n in names], dims, dims[1:]):
        if tuple(w.shape) != (o, a) or tuple(b.shape) != (o,):
            raise ValueError(f"{what}: a layer of shape {tuple(w.shape)} / {tuple(b.shape)} does not chain "
                             f"({a} inputs expected)")
    if dims[-1] != 1:
        raise ValueError(f"{what} gives {dims[-1]} numbers per image; an aesthetic head gives one score")
    with torch.inference_mode(False):
        head = AestheticHead(dims)
        with torch.no_grad():
            for layer, n in zip(head.layers, names):
                layer.weight.copy_(sd[f"{n}weight"].float())
                layer.bias.copy_(sd[f"{n}bias"].float())
        for p in head.parameters():
            p.requires_grad_(False)
    return head.eval()


def read_head_file(path) -> AestheticHead:
    """An aesthetic head from a ``.safetensors`` file or a ``.pth``/``.pt`` state dict, read with
    ``weights_only=True`` (a pickle that holds anything but tensors is refused, never run)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"aesthetic head {path} does not exist")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            with torch.inference_mode(False):
                sd = load_file(str(path))
        except Exception as e:
            raise ValueError(f"{path.name} is not a readable safetensors file ({e})") from None
    else:
        try:
            with torch.inference_mode(False):
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path.name} is not a plain state dict of tensors (read weights-only: {first}); "
                             f"save the head's state_dict() or convert it to .safetensors") from None
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"{path.name} is not a plain state dict of tensors; save the head's state_dict()")
    return aesthetic_head(sd, path.name)


class AestheticReward(nn.Module):
    """The LAION aesthetic score of images: ``head(e / |e|)`` with ``e`` the CLIP image embedding.

    ``embed(pixels) -> [B, d]``: the vision model's projected embedding of CLIP-normalised
    pixels (:func:`clip_pixels`), with gradient. The prompt is not used."""

    needs_labels = False

    def __init__(self, embed, head: AestheticHead, embed_dim: int, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD,
                 name: str = "aesthetic"):
        super().__init__()
        if int(embed_dim) != head.in_features:
            raise ValueError(f"the aesthetic head takes {head.in_features}-d embeddings but the vision model gives "
                             f"{embed_dim}-d ones: the LAION heads belong to CLIP ViT-L/14 (768-d); load that vision "
                             f"model in CLIPVisionLoader")
        self.embed, self.head = embed, head
        self.size, self.mean, self.std, self.name = int(size), tuple(mean), tuple(std), name

    def forward(self, images: torch.Tensor, labels=None) -> torch.Tensor:
        e = self.embed(clip_pixels(images, self.size, self.mean, self.std)).float()
        e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.head(e).squeeze(-1)


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


def _looks_like_head(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    return keys == {"weight", "bias"} or "layers.0.weight" in keys


def load_reward(path, device=None, clip_features=None):
    """The reward in ``path`` (a safetensors file this pack wrote), out of inference mode so that
    gradients flow through it even when the caller runs under ``torch.inference_mode`` (as
    ComfyUI runs every node): a :class:`ClassifierReward`, or a
    :class:`~.preference.PreferenceReward` on the features it was trained on (a classifier
    reward's, read from the same folder, or ``clip_features``: ``images -> [B, d]``, the CLIP
    vision features the caller builds, with a ``dim``)."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix.lower() in (".pth", ".pt", ".ckpt", ".bin"):
        raise ValueError(f"{path.name} is a pickle file, not a Hyper-SD reward file; a LAION aesthetic head (.pth) "
                         f"loads in the 'Hyper-SD Aesthetic Reward (LAION)' node with a CLIP vision model")
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
    if kind == "preference":
        return _load_preference(path, sd, meta, device, clip_features)
    if kind != CLASSIFIER:
        hint = ("a LAION aesthetic head: load it in the 'Hyper-SD Aesthetic Reward (LAION)' node"
                if set(meta) <= {"format"} and _looks_like_head(path) else
                "it may be a LoRA or a checkpoint: put reward models in the hypersd_rewards folder")
        raise ValueError(f"{path.name} is not a Hyper-SD reward file (its metadata has no '{KIND}: {CLASSIFIER}'); "
                         f"{hint}")
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


def _load_preference(path: Path, sd, meta, device, clip_features):
    from . import preference

    head = preference.load_head(sd, meta, path.name)
    source = meta.get("hypersd.preference_features", "")
    if source.startswith("classifier:"):
        name = source[len("classifier:"):]
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(f"{path.name}: its feature model {name!r} is not a plain file name")
        feature_path = path.parent / name
        if not feature_path.is_file():
            raise ValueError(f"{path.name} scores pictures with the features of the reward '{name}', which is not "
                             f"beside it in {path.parent.name}: put that file there too")
        clf = load_reward(feature_path, device=device)
        if not isinstance(clf, ClassifierReward):
            raise ValueError(f"{path.name}: its feature model '{name}' is not a classifier reward")
        features = clf.classifier.features
        dim = clf.classifier.channels[-1]
    elif source == "clip_vision":
        if clip_features is None:
            raise ValueError(f"{path.name} was trained on CLIP vision features: connect the same CLIP vision model "
                             f"(CLIPVisionLoader) to the reward loader's clip_vision input")
        features, dim = clip_features, getattr(clip_features, "dim", head.dim)
    else:
        raise ValueError(f"{path.name}: unknown feature model {source!r} in its metadata; train it again with the "
                         f"'Hyper-SD Train Preference Reward' node")
    if int(dim) != head.dim:
        raise ValueError(f"{path.name} takes {head.dim}-d features but its feature model gives {dim}-d ones: connect "
                         f"the model it was trained on ({source})")
    with torch.inference_mode(False):
        reward = preference.PreferenceReward(features, head, name=path.stem)
        if device is not None:
            reward.to(device)
    return reward
