#!/usr/bin/env python3
"""Your own ratings, end to end on the toy: rate, train a preference reward, steer the LoRA.

    .venv/bin/python -m bench.bench_preference [--per-digit 20] [--feedback-steps 40]

Through one real ComfyUI server (``main.py --cpu``, a temporary base folder, the pack and the
toy linked in), with the same nodes and routes a user has:

1. the toy's unified LoRA draws ``--per-digit`` digits of each class at 4 steps (Hyper-SD LoRA
   Loader, its own recipe) into ``HyperSDRateImages``;
2. a scripted rater with a clear taste, bold strokes (its measure: the ink mass, the mean
   darkness of the page), rates them through ``POST /hypersd/ratings`` as the page does, with
   the context the node reported: within each digit it likes the boldest ``--like`` and
   dislikes the lightest ``--like`` pictures, and for the two pairs in the middle says which of
   the two it prefers;
3. ``HyperSDTrainPreferenceReward`` fits the Bradley-Terry head on the toy reward classifier's
   features (not the judge) with a fifth of the pairs held out: its held-out agreement;
4. ``HyperSDTrainFeedback`` trains a feedback LoRA on the unified LoRA at 4 steps against it
   (a hinge at ``--margin`` standard deviations over the rated pictures) and, with weight
   ``--digit-reward-weight``, the toy reward (the prompted digit's log-probability: a picture
   that gains ink by ceasing to be the digit loses there), as a user combines a taste with a
   quality reward;
5. before and after (the feedback merged at each of ``--ratios``), at 4 steps, 50 new digits
   of each class (other seeds): the rater's measure (mean ink mass), and the judge's accuracy
   and FID (``toy/quality.py``), printed as a table; a grid of the same seeds before and after
   (at ``--grid-ratio``) is written to ``--grid``.

Targets (issue 14): agreement >= 80%, ink mass +20% or more, accuracy >= 0.9 and FID within
1.3x of the LoRA before feedback. :func:`loop` is also what the test runs, at a small size.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hypersd_dev import REPO, comfy_dir
from hypersd_dev.server import ComfyServer

WEIGHTS = REPO / "toy" / "weights"
LORA = "hypersd_toy_tscd_lora.safetensors"
REWARD = "hypersd_toy_reward.safetensors"
HEAD = "toy_bold_strokes"
STEPS = 4


def ink_mass(img) -> float:
    """The rater's measure: the mean darkness of the page (0 = blank white, 1 = all ink)."""
    a = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    return float(1.0 - a.mean())


def draw_graph(ckpt: str, lora: str, per_digit: int, seed: int, sink: str, prefix: str) -> dict:
    """Each digit ``per_digit`` times at 4 steps with the LoRA's recipe (Hyper-SD LoRA Loader),
    into ``sink`` (HyperSDRateImages or SaveImage)."""
    from toy import data

    g = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
         "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
         "lora": {"class_type": "HyperSDLoraLoader", "inputs": {"model": ["ckpt", 0], "lora_name": lora,
                                                                "strength": -1.0, "steps": STEPS}}}
    for d in range(10):
        g[f"pos{d}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": data.PROMPT.format(d), "clip": ["ckpt", 1]}}
        g[f"lat{d}"] = {"class_type": "EmptyLatentImage", "inputs": {"width": data.SIZE, "height": data.SIZE,
                                                                      "batch_size": per_digit}}
        g[f"ks{d}"] = {"class_type": "SamplerCustom", "inputs": {
            "model": ["lora", 0], "add_noise": True, "noise_seed": seed + d, "cfg": 1.0, "positive": [f"pos{d}", 0],
            "negative": ["neg", 0], "sampler": ["lora", 4], "sigmas": ["lora", 5], "latent_image": [f"lat{d}", 0]}}
        g[f"dec{d}"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"ks{d}", 0], "vae": ["ckpt", 2]}}
        inputs = {"images": [f"dec{d}", 0], "filename_prefix": f"{prefix}_{d}"}
        g[f"out{d}"] = {"class_type": sink, "inputs": inputs}
    return g


def rate(srv, entry, like: int) -> dict:
    """The scripted rater: per digit, like the ``like`` boldest, dislike the ``like`` lightest,
    and a 'prefer' for each pair in the middle (the bolder one). Returns counts."""
    counts = {"like": 0, "dislike": 0, "prefer": 0}
    for d in range(10):
        out = entry["outputs"][f"out{d}"]
        refs, context = out["images"], out["hypersd_rating"][0]
        inks = [ink_mass(im) for im in srv.images(entry, f"out{d}")]
        order = sorted(range(len(refs)), key=lambda i: inks[i])
        ratings = [("like", i) for i in order[::-1][:like]] + [("dislike", i) for i in order[:like]]
        middle = order[like:len(order) - like]
        for i, (kind, j) in enumerate(ratings + [("prefer", p) for p in zip(middle[1::2], middle[0::2])]):
            body = {"kind": kind, "prompt": context["prompt"], "seed": context["seed"],
                    "checkpoint": context["checkpoint"], "loras": context["loras"], "source": "scripted rater"}
            if kind == "prefer":
                bolder, other = j if inks[j[0]] >= inks[j[1]] else j[::-1]
                body.update(image=refs[bolder], other=refs[other], sampler=context["sampler"])
            else:
                body.update(image=refs[j], sampler={**context["sampler"], "batch_index": j})
            status, answer = srv.rate(body)
            if status != 200:
                raise RuntimeError(f"the rating route answered {status}: {answer}")
            counts[kind] += 1
    return counts


def feedback_graph(ckpt: str, lora: str, args) -> dict:
    from toy.data import DATASET_FOLDER

    digits = {"digits": {"class_type": "HyperSDRewardLoader", "inputs": {
        "reward_name": REWARD, "margin": -0.05, "weight": args.digit_reward_weight}}}
    return {**(digits if args.digit_reward_weight > 0 else {}),
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "data": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": DATASET_FOLDER}},
        "dataset": {"class_type": "MakeTrainingDataset", "inputs": {
            "images": ["data", 0], "texts": ["data", 1], "vae": ["ckpt", 2], "clip": ["ckpt", 1]}},
        "reward": {"class_type": "HyperSDRewardLoader", "inputs": {
            "reward_name": f"{HEAD}.safetensors", "margin": args.margin, "weight": 1.0,
            **({"rewards": ["digits", 0]} if args.digit_reward_weight > 0 else {})}},
        "train": {"class_type": "HyperSDTrainFeedback", "inputs": {
            "model": ["ckpt", 0], "lora_name": lora, "vae": ["ckpt", 2], "rewards": ["reward", 0],
            "latents": ["dataset", 0], "positive": ["dataset", 1], "steps_of_lora": str(STEPS),
            **({"captions": ["data", 1]} if args.digit_reward_weight > 0 else {}),
            "steps": args.feedback_steps, "learning_rate": args.lr, "rank": 8, "merge_ratio": args.merge_ratio,
            "eta": 1.0, "structure_weight": 0.0, "seed": args.seed, "batch_size": args.batch,
            "output_name": f"{HEAD}_feedback", "checkpoint_every": 0, "resume": False, "lora_scope": "all"}},
    }


def measure(srv, ckpt: str, lora: str, per_digit: int, seed: int, prefix: str) -> tuple[dict, list]:
    import torch

    from toy import quality

    entry = srv.run(draw_graph(ckpt, lora, per_digit, seed, "SaveImage", prefix), timeout=3600)
    images, labels = [], []
    for d in range(10):
        ims = srv.images(entry, f"out{d}")
        images += ims
        labels += [d] * len(ims)
    q = quality.measure(images, torch.tensor(labels))
    return {"ink_mass": float(np.mean([ink_mass(im) for im in images])), "accuracy": q["accuracy"],
            "fid": q["fid"], "n": len(images)}, images


def loop(args, base: Path) -> dict:
    """The whole loop in the server folder ``base``; returns its numbers."""
    from toy import data, install

    ckpt = install.install(Path(args.models_dir))["checkpoint"]
    for folder, src in (("checkpoints", ckpt), ("loras", WEIGHTS / LORA), ("hypersd_rewards", WEIGHTS / REWARD)):
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        link = base / "models" / folder / src.name
        if not link.exists():
            link.symlink_to(src.resolve())
    data.write_dataset(base / "input" / data.DATASET_FOLDER, args.train_per_digit)
    res: dict = {"settings": {k: v for k, v in vars(args).items() if k not in ("grid",)}}
    t0 = time.time()
    with ComfyServer(base, env={"HYPERSD_RATINGS_DB": str(base / "ratings.sqlite3")}) as srv:
        entry = srv.run(draw_graph(ckpt.name, LORA, args.per_digit, args.seed, "HyperSDRateImages", "to_rate"),
                        timeout=3600)
        res["ratings"] = rate(srv, entry, args.like)
        res["stored_ratings"] = srv.request("GET", "/hypersd/ratings")[1]["count"]
        out = srv.run({"train": {"class_type": "HyperSDTrainPreferenceReward", "inputs": {
            "features_from": REWARD, "output_name": HEAD, "margin": args.margin, "weight": 1.0, "holdout": 0.2,
            "steps": 400, "learning_rate": 0.05, "seed": args.seed}}})["outputs"]["train"]["text"][0]
        from safetensors import safe_open

        with safe_open(str(base / "models" / "hypersd_rewards" / f"{HEAD}.safetensors"), "pt") as f:
            meta = f.metadata()
        res["preference"] = {"report": out, "agreement": float(meta["hypersd.preference_agreement"]),
                             "pairs": int(meta["hypersd.preference_pairs"]),
                             "held_out_pairs": int(meta["hypersd.preference_held_out_pairs"])}
        t1 = time.time()
        srv.run(feedback_graph(ckpt.name, LORA, args), timeout=4 * 3600)
        res["feedback_seconds"] = round(time.time() - t1, 1)
        res["before"], before_imgs = measure(srv, ckpt.name, LORA, args.eval_per_digit, args.eval_seed, "before")
        res["after"], shown = {}, None
        for ratio in args.ratios:
            name = merge_at(base / "models" / "loras", ratio)
            res["after"][f"{ratio:g}"], imgs = measure(srv, ckpt.name, name, args.eval_per_digit, args.eval_seed,
                                                       f"after_{ratio:g}")
            if ratio == args.grid_ratio:
                shown = imgs
    res["seconds"] = round(time.time() - t0, 1)
    if args.grid and shown is not None:
        write_grid(before_imgs, shown, args.eval_per_digit, Path(args.grid), f"after (merge {args.grid_ratio:g})")
        res["grid"] = str(args.grid)
    return res


def merge_at(loras: Path, ratio: float) -> str:
    """The unified LoRA with the feedback alone (``<HEAD>_feedback_feedback``) merged at ``ratio``
    (exact rank concatenation, the unified LoRA's recipe kept), into the server's loras folder."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ComfyUI_HyperSD.hypersd_core import files, lora_merge

    merged = loras / f"{HEAD}_feedback.safetensors"  # the node's file: merged at its merge_ratio, recipe kept
    with safe_open(str(merged), "pt") as f:
        meta = dict(f.metadata())
    name = f"{HEAD}_feedback_x{ratio:g}.safetensors"
    sd = lora_merge.merge_cat(load_file(str(loras / LORA)), load_file(str(loras / f"{HEAD}_feedback_feedback.safetensors")),
                              1.0, ratio)
    files.save_safetensors(loras / name, sd, {**meta, "hypersd.merge_ratio": f"{ratio:g}"})
    return name


def write_grid(before: list, after: list, per_digit: int, path: Path, label: str, columns: int = 4) -> None:
    """Rows: digits 0-9; left the first ``columns`` pictures before feedback, right the same seeds after."""
    from PIL import Image, ImageDraw

    from ComfyUI_HyperSD.hypersd_core import files

    s = before[0].size[0]
    columns = min(columns, per_digit)
    gap = 8
    grid = Image.new("L", (2 * columns * s + gap, 10 * s + 14), 255)  # grey pages: a small file
    draw = ImageDraw.Draw(grid)
    draw.text((2, 1), "before feedback", fill=0)
    draw.text((columns * s + gap + 2, 1), label, fill=0)
    for d in range(10):
        for c in range(columns):
            grid.paste(before[d * per_digit + c].convert("L"), (c * s, 14 + d * s))
            grid.paste(after[d * per_digit + c].convert("L"), (columns * s + gap + c * s, 14 + d * s))
    files.atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def table(res: dict) -> str:
    b, p = res["before"], res["preference"]
    lines = [f"ratings through POST /hypersd/ratings: {res['ratings']} ({res['stored_ratings']} stored)",
             f"preference reward: {p['report']}",
             "",
             f"| 4 steps, {b['n']} digits (unified LoRA, TCD) | ink mass (the rater's measure) | / before | judge accuracy "
             f"| judge FID | / before |",
             "|---|---|---|---|---|---|",
             f"| before feedback | {b['ink_mass']:.4f} | 1 | {b['accuracy']:.3f} | {b['fid']:.1f} | 1 |"]
    met = []
    for ratio, a in res["after"].items():
        ink, fid = a["ink_mass"] / b["ink_mass"], a["fid"] / b["fid"]
        lines.append(f"| feedback merged at {ratio} | {a['ink_mass']:.4f} | {ink:.2f}x | {a['accuracy']:.3f} | "
                     f"{a['fid']:.1f} | {fid:.2f}x |")
        if ink >= 1.2 and a["accuracy"] >= 0.9 and fid <= 1.3:
            met.append(ratio)
    lines += ["",
              f"targets: held-out agreement >= 80% ({p['agreement']:.1%}: {'met' if p['agreement'] >= 0.8 else 'NOT met'}); "
              f"ink mass >= 1.2x with accuracy >= 0.9 and FID <= 1.3x before: "
              f"{'met at merge ' + ', '.join(met) if met else 'NOT met at any merge ratio'}",
              f"feedback training {res['feedback_seconds']} s; whole loop {res['seconds']} s"]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-digit", type=int, default=20, help="pictures rated per digit (200 in all)")
    ap.add_argument("--like", type=int, default=8, help="liked (boldest) and disliked (lightest) per digit")
    ap.add_argument("--train-per-digit", type=int, default=10, help="training digits per class for the feedback")
    ap.add_argument("--feedback-steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--margin", type=float, default=1.0, help="hinge margin in standard deviations of the rated pictures")
    ap.add_argument("--digit-reward-weight", type=float, default=1.0,
                    help="weight of the toy reward (the prompted digit's log-probability, margin -0.05) beside the "
                         "preference, so the digits stay digits (0: the preference alone)")
    ap.add_argument("--merge-ratio", type=float, default=1.0, help="the node's merge_ratio (its merged file)")
    ap.add_argument("--ratios", type=lambda v: [float(x) for x in v.split(",") if x.strip()],
                    default=[0.25, 0.5, 0.6, 0.7, 1.0],
                    help="merge ratios measured after feedback")
    ap.add_argument("--grid-ratio", type=float, default=0.6, help="the merge ratio the grid shows")
    ap.add_argument("--eval-per-digit", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seed", type=int, default=5000)
    ap.add_argument("--models-dir", default=str(comfy_dir() / "models"))
    ap.add_argument("--grid", default=str(REPO / "bench" / "results" / "preference_grid.png"),
                    help="the before/after grid (the README shows bench/results/preference_grid.png)")
    ap.add_argument("--json", help="also write the figures here (bench/results.py; scripts/bench.sh does)")
    ap.add_argument("--quick", action="store_true", help="a minute: 60 rated digits, 4 feedback steps of 4, 50 judged")
    return ap


QUICK = {"per_digit": 6, "like": 2, "train_per_digit": 2, "feedback_steps": 4, "batch": 4, "eval_per_digit": 5,
         "ratios": [0.5, 1.0], "grid_ratio": 1.0}


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
        if args.grid == parser().get_default("grid"):
            args.grid = str(REPO / "bench" / "results" / "quick" / "preference_grid.png")
    base = Path(tempfile.mkdtemp(prefix="hypersd-preference-"))
    try:
        res = loop(args, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(table(res))
    if args.json:
        from bench import results

        settings = res.pop("settings")
        results.save(args.json, "preference", res, settings, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
