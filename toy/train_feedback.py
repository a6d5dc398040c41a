#!/usr/bin/env python3
"""Train a feedback LoRA on one of the toy's few-step LoRAs with ``HyperSDTrainFeedback``, through a real server.

Run with the host's Python after set-up (the toy must be installed)::

    .venv/bin/python -m toy.train_feedback [--preset k4|k2|unified] [--steps 60] [--out PATH]

It starts a real ComfyUI (``main.py --cpu``, a temporary base folder, the pack linked in),
links the toy checkpoint, the chosen LoRA (from ``toy/weights``) and the toy's reward model
(``hypersd_toy_reward``, made by ``toy/train_reward.py``: NOT the judge of ``quality.py``)
into its model folders, writes training digits with one caption each into ``input/``, and
queues one graph::

    LoadImageTextDataSetFromFolder -> MakeTrainingDataset (VAE + CLIP of the checkpoint)
    HyperSDRewardLoader (margin, weight) --rewards--> HyperSDTrainFeedback <- model, LoRA, VAE,
                                                      latents, one prompt and caption per latent

The merged LoRA the node saves (``<name>.safetensors``: the few-step LoRA and the feedback at
``--merge-ratio``) is copied to ``--out`` and the feedback alone (``<name>_feedback``) beside
it. Everything is seeded (``--seed``).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

from hypersd_dev import REPO, comfy_dir
from hypersd_dev.server import ComfyServer
from ComfyUI_HyperSD.hypersd_core import feedback, files

from .train_reward import REWARD_FILE
from .train_student import DATASET_FOLDER, toy_checkpoint, write_dataset

WEIGHTS = REPO / "toy" / "weights"
log = logging.getLogger("hypersd.toy.train_feedback")
# the committed feedback LoRAs: the LoRA trained on, its step counts and sampler eta, the merge ratio
# of the merged file (chosen on bench_tscd --quality --feedback's curve)
PRESETS = {
    "k4": {"lora": "hypersd_toy_tscd_lora_stage2_k4.safetensors", "steps_of_lora": "4", "eta": 0.0,
           "name": "hypersd_toy_feedback_lora_k4", "merge_ratio": 0.75, "scored_steps": "late half",
           "anchor_weight": 0.0, "eta_of_lora": False, "steps": 60},
    "k2": {"lora": "hypersd_toy_tscd_lora_stage3_k2.safetensors", "steps_of_lora": "2", "eta": 0.0,
           "name": "hypersd_toy_feedback_lora_k2", "merge_ratio": 1.0, "scored_steps": "late half",
           "anchor_weight": 0.0, "eta_of_lora": True, "steps": 180},
    "unified": {"lora": "hypersd_toy_tscd_lora.safetensors", "steps_of_lora": "1,2,4", "eta": 1.0,
                "name": "hypersd_toy_feedback_lora_unified", "merge_ratio": 0.5, "scored_steps": "whole schedule",
                "anchor_weight": 2.0, "eta_of_lora": True, "steps": 60},
}


def feedback_graph(ckpt: str, folder: str, lora: str, name: str, args) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "data": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": folder}},
        "dataset": {"class_type": "MakeTrainingDataset", "inputs": {
            "images": ["data", 0], "texts": ["data", 1], "vae": ["ckpt", 2], "clip": ["ckpt", 1]}},
        "reward": {"class_type": "HyperSDRewardLoader", "inputs": {
            "reward_name": REWARD_FILE, "margin": args.margin, "weight": 1.0}},
        "train": {"class_type": "HyperSDTrainFeedback", "inputs": {
            "model": ["ckpt", 0], "lora_name": lora, "vae": ["ckpt", 2], "rewards": ["reward", 0],
            "latents": ["dataset", 0], "positive": ["dataset", 1], "captions": ["data", 1],
            "steps_of_lora": args.steps_of_lora, "steps": args.steps, "learning_rate": args.lr, "rank": args.rank,
            "merge_ratio": args.merge_ratio, "eta": args.eta, "structure_weight": args.structure_weight,
            "seed": args.seed, "batch_size": args.batch, "output_name": name,
            "checkpoint_every": args.checkpoint_every, "resume": args.resume, "lora_scope": args.lora_scope,
            "scored_steps": args.scored_steps, "anchor_weight": args.anchor_weight, "eta_of_lora": args.eta_of_lora}},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="k4",
                    help="which toy LoRA: k4 (the 4-step LoRA, DDIM at 4 steps), k2 (the 2-step LoRA at its own "
                         "eta, TCD 0.3) or unified (TCD at 1, 2 and 4 steps, each at the LoRA's own eta); sets "
                         "--lora, --steps-of-lora, --steps, --eta, --eta-of-lora, --name, --merge-ratio, "
                         "--scored-steps and --anchor-weight")
    ap.add_argument("--lora", help="the few-step LoRA (a file of toy/weights) the feedback trains on")
    ap.add_argument("--steps-of-lora", help="the step count(s) the LoRA is used at")
    ap.add_argument("--steps", type=int, help="optimizer steps per step count (default: the preset's)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--margin", type=float, default=-0.05, help="the reward's hinge margin (log-probability)")
    ap.add_argument("--structure-weight", type=float, default=0.5)
    ap.add_argument("--merge-ratio", type=float, help="the feedback's strength in the merged file")
    ap.add_argument("--eta", type=float, help="the LoRA's sampler eta on the way to the late step")
    ap.add_argument("--scored-steps", choices=list(feedback.SCORED_STEPS),
                    help="where on the LoRA's schedule the reward scores the one-step picture (default: the "
                         "preset's; 'late half' for k4)")
    ap.add_argument("--anchor-weight", type=float,
                    help="the anchor to the frozen LoRA's one-step pictures (0: off; default: the preset's, 0 for "
                         "k4, 2 for unified)")
    ap.add_argument("--eta-of-lora", action=argparse.BooleanOptionalAction, default=None,
                    help="each step count at the eta the LoRA's sampler uses there (its own table) instead of --eta "
                         "(default: the preset's)")
    ap.add_argument("--lora-scope", choices=["transformer", "all"], default="all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-digit", type=int, default=20, help="captioned training digits per class")
    ap.add_argument("--checkpoint-every", type=int, default=0)
    ap.add_argument("--name", help="output_name given to the node")
    ap.add_argument("--out", type=Path, help="where the merged LoRA is copied (default toy/weights/<name>)")
    ap.add_argument("--models-dir", type=Path, default=comfy_dir() / "models")
    ap.add_argument("--work-dir", type=Path, help="server base folder (default: a temporary one, removed after)")
    ap.add_argument("--resume", action="store_true", help="continue the run saved in --work-dir")
    ap.add_argument("--timeout", type=float, default=4 * 3600)
    args = ap.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.resume and args.work_dir is None:
        ap.error("--resume continues the run saved in --work-dir: give --work-dir")
    out = args.out or WEIGHTS / f"{args.name}.safetensors"
    logging.basicConfig(level=logging.INFO, format="[train_feedback %(asctime)s] %(message)s", datefmt="%H:%M:%S")

    base = args.work_dir or Path(tempfile.mkdtemp(prefix="hypersd-feedback-"))
    base.mkdir(parents=True, exist_ok=True)
    ckpt = toy_checkpoint(args.models_dir, None, base / "scratch")
    for folder, src in (("checkpoints", ckpt), ("loras", WEIGHTS / args.lora), ("hypersd_rewards", WEIGHTS / REWARD_FILE)):
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        link = base / "models" / folder / src.name
        if not link.exists():
            link.symlink_to(src.resolve())
    n = write_dataset(base / "input" / DATASET_FOLDER, args.per_digit)
    log.info("dataset: %d captioned digits; feedback on %s at %s steps", n, args.lora, args.steps_of_lora)
    t0 = time.time()
    try:
        with ComfyServer(base) as srv:
            srv.run(feedback_graph(ckpt.name, DATASET_FOLDER, args.lora, args.name, args), timeout=args.timeout)
        loras = base / "models" / "loras"
        files.copy_file(loras / f"{args.name}.safetensors", out)
        own = out.with_name(out.stem + "_feedback.safetensors")
        files.copy_file(loras / f"{args.name}_feedback.safetensors", own)
        summary = {"out": str(out), "feedback": str(own), "seconds": round(time.time() - t0, 1), "images": n}
        log.info("done: %s", json.dumps(summary))
        print(json.dumps(summary))
        return 0
    finally:
        if args.work_dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
