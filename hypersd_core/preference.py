"""A preference reward trained from the user's own ratings (:mod:`.ratings`), in plain torch.

Ratings become pairs ``(winner, loser)``:

1. within one prompt, every picture whose latest like/dislike rating is ``like`` beats every
   picture of that prompt whose latest one is ``dislike`` (pictures of different prompts are
   never compared: the prompt, not the taste, would decide);
2. an explicit ``prefer`` rating is one pair as given;
3. each ordered pair counts once.

A small head ``s(x) = w . (f(x) - mu) / sd + b`` on frozen image features ``f`` (a CLIP vision
model's embedding, or for the toy its reward classifier's pooled features) is fitted by the
Bradley-Terry model, ``P(winner beats loser) = sigmoid(s(winner) - s(loser))``, minimising::

    L = - mean over pairs of log sigmoid(s(x_w) - s(x_l))      (+ weight decay on w)

A share of the pairs (``holdout``, drawn by the seed) is kept out of training; the head's
*agreement* is the fraction of held-out pairs it orders as the rater did. The score is then
shifted and scaled to mean 0 and standard deviation 1 over the rated pictures (the order,
hence the agreement, is unchanged), so a hinge margin of 1 asks for pictures one standard
deviation above the average rated one. The reward (:class:`PreferenceReward`) is that score
with gradient through the features, for the feedback loss.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

PREFERENCE = "preference"  # the hypersd.reward kind of a preference head file
MIN_PAIRS = 10


class NotEnoughRatings(ValueError):
    """Too few pairs to train on; the message says how many more ratings are needed."""


def pairs_from_ratings(rows: Iterable[Mapping]) -> list[tuple[str, str]]:
    """``[(winner, loser), ...]`` image keys (``image_type/image``) from rating rows, in a
    canonical order (see the module docstring for the rules)."""
    latest: dict[str, tuple[int, str, str]] = {}  # image -> (id, kind, prompt) of its latest like/dislike
    pairs: list[tuple[str, str]] = []
    for r in sorted(rows, key=lambda r: int(r["id"])):
        key = f"{r['image_type']}/{r['image']}"
        if r["kind"] == "prefer":
            pairs.append((key, f"{r['image_type']}/{r['other_image']}"))
        elif r["kind"] in ("like", "dislike"):
            latest[key] = (int(r["id"]), r["kind"], r.get("prompt") or "")
    by_prompt: dict[str, dict[str, list[str]]] = {}
    for key, (_, kind, prompt) in sorted(latest.items()):
        by_prompt.setdefault(prompt, {"like": [], "dislike": []})[kind].append(key)
    for prompt in sorted(by_prompt):
        for w in by_prompt[prompt]["like"]:
            pairs += [(w, l) for l in by_prompt[prompt]["dislike"]]
    seen, out = set(), []
    for p in pairs:
        if p not in seen and p[0] != p[1]:
            seen.add(p)
            out.append(p)
    return out


def check_enough(n_pairs: int, min_pairs: int = MIN_PAIRS) -> None:
    if n_pairs < min_pairs:
        raise NotEnoughRatings(
            f"the ratings give {n_pairs} preference pair(s); a preference reward needs at least {min_pairs}: rate "
            f"about {min_pairs - n_pairs} more (a like and a dislike of pictures of the same prompt make a pair, "
            f"so do a few of each; every 'prefer' choice is one pair)")


def bradley_terry_loss(s_win: torch.Tensor, s_lose: torch.Tensor) -> torch.Tensor:
    """``-mean(log sigmoid(s_win - s_lose))``: the negative log-likelihood of the observed
    orderings under the Bradley-Terry model."""
    return -F.logsigmoid(s_win - s_lose).mean()


class PreferenceHead(nn.Module):
    """``(f - mean) / std`` then ``Linear(d, 1)``, then ``* scale + shift`` (the final
    standardisation of the score); ``mean``/``std`` are the rated pictures' feature statistics."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(int(dim), 1)
        self.register_buffer("mean", torch.zeros(int(dim)))
        self.register_buffer("std", torch.ones(int(dim)))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("shift", torch.zeros(()))

    @property
    def dim(self) -> int:
        return int(self.linear.in_features)

    def raw(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear((feats.float() - self.mean) / self.std).squeeze(-1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.raw(feats) * self.scale + self.shift


@dataclass
class PreferenceReport:
    pairs: int
    train_pairs: int
    held_out_pairs: int
    agreement: float  # on the held-out pairs
    train_agreement: float
    images: int
    extra: dict = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        return {"hypersd.preference_pairs": str(self.pairs), "hypersd.preference_train_pairs": str(self.train_pairs),
                "hypersd.preference_held_out_pairs": str(self.held_out_pairs),
                "hypersd.preference_agreement": f"{self.agreement:.4f}",
                "hypersd.preference_train_agreement": f"{self.train_agreement:.4f}",
                "hypersd.preference_images": str(self.images)}

    def summary(self) -> str:
        return (f"{self.pairs} pairs from {self.images} rated pictures: trained on {self.train_pairs}, held out "
                f"{self.held_out_pairs}; the reward orders {self.agreement:.1%} of the held-out pairs as you did "
                f"({self.train_agreement:.1%} of the training pairs)")


def train_head(features: torch.Tensor, pairs: Sequence[tuple[int, int]], *, holdout: float = 0.2, steps: int = 400,
               learning_rate: float = 0.05, weight_decay: float = 1e-3, seed: int = 0,
               min_pairs: int = MIN_PAIRS) -> tuple[PreferenceHead, PreferenceReport]:
    """Fit a :class:`PreferenceHead` to ``pairs`` of row indices ``(winner, loser)`` into
    ``features`` ``[N, d]`` (frozen).

    1. refuse fewer than ``min_pairs`` pairs (:class:`NotEnoughRatings`);
    2. shuffle the pairs with ``seed``, keep ``round(holdout * n)`` of them (at least one when
       ``holdout`` > 0) out of training;
    3. standardise the features with the statistics of all rated pictures;
    4. full-batch Adam on the Bradley-Terry loss of the training pairs for ``steps`` steps
       (weight decay on the linear weights);
    5. the agreement: the share of held-out (and of training) pairs ordered as the rater did;
    6. rescale the score to mean 0, standard deviation 1 over the rated pictures.
    """
    check_enough(len(pairs), min_pairs)
    if not 0.0 <= float(holdout) < 1.0:
        raise ValueError(f"holdout is the share of pairs kept out of training, in [0, 1): got {holdout}")
    with torch.inference_mode(False):
        feats = features.detach().float().clone()
        if feats.dim() != 2 or not torch.isfinite(feats).all():
            raise ValueError(f"features must be a finite [N, d] tensor, got shape {tuple(feats.shape)}")
        gen = torch.Generator().manual_seed(int(seed))
        pr = torch.tensor([list(p) for p in pairs], dtype=torch.long)
        pr = pr[torch.randperm(len(pr), generator=gen)]
        n_hold = 0 if holdout <= 0 else max(1, int(round(float(holdout) * len(pr))))
        n_hold = min(n_hold, len(pr) - 1)
        held, train = pr[:n_hold], pr[n_hold:]
        head = PreferenceHead(feats.shape[1])
        head.mean.copy_(feats.mean(0))
        head.std.copy_(feats.std(0).clamp_min(1e-6) if len(feats) > 1 else torch.ones(feats.shape[1]))
        with torch.no_grad():
            head.linear.weight.normal_(0.0, 0.01, generator=gen)
            head.linear.bias.zero_()
        opt = torch.optim.Adam(head.linear.parameters(), lr=float(learning_rate))
        for _ in range(int(steps)):
            s = head.raw(feats)
            loss = bradley_terry_loss(s[train[:, 0]], s[train[:, 1]]) + weight_decay * head.linear.weight.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            s = head.raw(feats)

            def agree(p):
                return float((s[p[:, 0]] > s[p[:, 1]]).float().mean()) if len(p) else math.nan

            sd = float(s.std()) if len(s) > 1 and float(s.std()) > 1e-8 else 1.0
            head.scale.fill_(1.0 / sd)
            head.shift.fill_(-float(s.mean()) / sd)
        for p in head.parameters():
            p.requires_grad_(False)
    rep = PreferenceReport(pairs=len(pr), train_pairs=len(train), held_out_pairs=len(held), agreement=agree(held),
                           train_agreement=agree(train), images=int(torch.unique(pr).numel()))
    return head.eval(), rep


class PreferenceReward(nn.Module):
    """The preference head's score of images, ``head(features(images))``, with gradient through
    the (frozen) feature model; the prompt is not used."""

    needs_labels = False

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor], head: PreferenceHead, name: str = PREFERENCE):
        super().__init__()
        self.features_fn = features
        self.head = head
        self.name = name
        if isinstance(features, nn.Module):
            self.feature_model = features

    def forward(self, images: torch.Tensor, labels=None) -> torch.Tensor:
        return self.head(self.features_fn(images).float())


# ---------------------------------------------------------------------- files


def save_head(path, head: PreferenceHead, features_from: str, report: PreferenceReport, extra: Mapping = ()) -> None:
    """Write the head (float32) with its metadata: ``hypersd.reward: preference``, the feature
    model it was trained on (``hypersd.preference_features``), the pairs and the agreement."""
    from . import files as fileio
    from .rewards import KIND

    meta = {KIND: PREFERENCE, "hypersd.preference_features": str(features_from),
            "hypersd.preference_dim": str(head.dim), **report.to_metadata()}
    meta.update({str(k): str(v) for k, v in dict(extra).items()})
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.state_dict().items()}
    fileio.save_safetensors(Path(path), sd, meta)


def load_head(sd: Mapping[str, torch.Tensor], meta: Mapping[str, str], what: str) -> PreferenceHead:
    """A :class:`PreferenceHead` from a file's tensors and metadata (outside inference mode)."""
    try:
        dim = int(meta["hypersd.preference_dim"])
        with torch.inference_mode(False):
            head = PreferenceHead(dim)
            head.load_state_dict({k: v.float() for k, v in sd.items()})
    except (KeyError, ValueError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{what}: not a complete preference head ({first}); train it again with the "
                         f"'Hyper-SD Train Preference Reward' node") from None
    for p in head.parameters():
        p.requires_grad_(False)
    return head.eval()
