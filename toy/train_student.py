#!/usr/bin/env python3
"""Distil the toy teacher into its Hyper-SD TSCD LoRA with ``HyperSDTrainTSCD``, through a real server.

Run with the host's Python after set-up (the toy teacher must be installed)::

    .venv/bin/python -m toy.train_student [--stages 8,4,2,1] [--steps-per-stage 250] [--out PATH]

It starts a real ComfyUI (``main.py --cpu``, a temporary base folder, the pack linked in,
the toy checkpoint linked into ``models/checkpoints``), writes training digits with one
caption each ("a handwritten digit N") into the server's ``input/`` folder, and queues
one graph made of ComfyUI's own nodes and this pack's trainer::

    LoadImageTextDataSetFromFolder -> MakeTrainingDataset (VAE + CLIP of the checkpoint)
    CheckpointLoaderSimple --model--> HyperSDTrainTSCD <- latents, one prompt per latent,
    CLIPTextEncode("") --negative-->   (teacher cfg 2)

After the TSCD stages the same run continues with ``--score-steps`` (default 300) of score
distillation (``score_steps`` of the node): the result is the toy's unified LoRA. The LoRA
the node saves into the server's ``models/loras`` is copied (atomically) to ``--out``
(default ``toy/weights/hypersd_toy_tscd_lora.safetensors``, the committed unified file), and
the LoRA of each earlier stage (``<name>_stage<n>_k<k>``: the 8-, 4-, 2-step LoRAs and the
TSCD result before score distillation, ``_stage4_k1``) beside it. ``--score-steps 0`` stops
after the TSCD stages; ``--work-dir DIR --resume`` continues the run saved in ``DIR``, e.g. a
finished TSCD run with score settings added or changed (the ablations of the benchmark).
``--stages 1,1,1,1 --score-steps 0`` with the same steps per stage trains the one-segment
baseline of the benchmark (``python -m bench.bench_tscd --quality``). Everything is seeded
(``--seed``): the node draws every step's batch, timesteps and noise from the seed and
the step number, and puts a captioned dataset in a canonical order, so the same machine
and library versions give the same files.

The committed 8-step LoRA (``_stage1_k8``) comes from a run of its own, ``--stages 8
--steps-per-stage 2000 --score-steps 0 --name hypersd_toy_k8x2000``, 62 minutes on one core
beside other jobs, copied over the 8,4,2,1 run's first stage (its ``recommended_*`` metadata set
to today's k-step recipe, TCD eta 0.3 on the trailing grid, as the k4 and k2 files'): eight times
the training, and made after the TSCD
stages began to train at the times their recipe samples at (``tscd.stage_timesteps``), so a
rerun of the 8,4,2,1 run today draws other timesteps than the committed 4- and 2-step files
saw. The other committed LoRAs were made with the defaults: stages 8,4,2,1 x 250 steps, batch 32, rank 8
on every layer, lr 1e-3 with the cosine schedule per stage, 50 digits per class, and teacher
cfg 2, the toy teacher's guidance, so that the FID of a student measures how well it keeps
the teacher's output; then 300 score-distillation steps (1 fake update a step, no regression
term, the TSCD term kept at weight 1, generator at t = 999: the toy's ablations measured both
guards as costs, see the README; the node's own defaults stay DMD2's 5 updates and DMD's 0.25).
The TSCD stages take about 50 minutes on one core of the 2-core CPU machine (0.33-0.35 steps
a second on the 64x64 toy), the score stage about 50 more (0.10 steps a second), each beside
other jobs. The committed files came from a run stopped after its TSCD stages and continued
with ``--resume`` (exact: the same weights as one uninterrupted run); its TSCD stage files
have the same weights as the TSCD-only run committed before them.
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
from hypersd_dev.fixtures import place
from hypersd_dev.server import ComfyServer
from ComfyUI_HyperSD.hypersd_core import files

from . import data, install
from .data import write_dataset
from .train_reward import REWARD_FILE
WEIGHTS = REPO / "toy" / "weights"
LORA_FILE = "hypersd_toy_tscd_lora.safetensors"
DATASET_FOLDER = data.DATASET_FOLDER
TEACHER_CFG = 2.0  # the guidance distilled into the toy LoRAs (the teacher's lowest FID at 25 steps)

log = logging.getLogger("hypersd.toy.train_student")


def training_graph(ckpt: str, folder: str, name: str, args) -> dict:
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "data": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": folder}},
        "dataset": {"class_type": "MakeTrainingDataset", "inputs": {
            "images": ["data", 0], "texts": ["data", 1], "vae": ["ckpt", 2], "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "train": {"class_type": "HyperSDTrainTSCD", "inputs": {
            "model": ["ckpt", 0], "latents": ["dataset", 0], "positive": ["dataset", 1], "negative": ["neg", 0],
            "stages": args.stages, "steps_per_stage": args.steps_per_stage, "learning_rate": args.lr,
            "rank": args.rank, "teacher_cfg": args.cfg, "seed": args.seed, "output_name": name,
            "checkpoint_every": args.checkpoint_every, "batch_size": args.batch, "resume": args.resume,
            "loss": args.loss, "lora_scope": args.lora_scope, "ema_decay": args.ema, "save_stages": True,
            "lr_schedule": args.lr_schedule, "score_steps": args.score_steps, "fake_updates": args.fake_updates,
            "regression_weight": args.regression_weight, "score_tscd_weight": args.score_tscd_weight,
            "generator_t": args.generator_t}},
    }
    if args.score_feedback_weight:  # the score stage's feedback term: the toy reward on the one-step pictures
        graph["reward"] = {"class_type": "HyperSDRewardLoader", "inputs": {
            "reward_name": REWARD_FILE, "margin": args.margin, "weight": 1.0}}
        graph["train"]["inputs"].update({"score_feedback_weight": args.score_feedback_weight, "vae": ["ckpt", 2],
                                         "rewards": ["reward", 0], "captions": ["data", 1]})
    return graph


def toy_checkpoint(models_dir: Path, unet: Path | None, scratch: Path) -> Path:
    """The assembled toy checkpoint: installed into ``models_dir`` (stamped, idempotent), or
    built in ``scratch`` around another UNet file (``--unet``, for trying the pipeline)."""
    if unet is None:
        return install.install(models_dir)["checkpoint"]
    weights = scratch / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    for name, src in (("toy_unet.safetensors", unet), ("toy_vae.safetensors", WEIGHTS / "toy_vae.safetensors")):
        if not (weights / name).exists():
            (weights / name).symlink_to(Path(src).resolve())
    return install.install(scratch / "models", weights=weights)["checkpoint"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="8,4,2,1", help="segment counts of the progressive stages ('1': one-segment)")
    ap.add_argument("--steps-per-stage", type=int, default=250)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.95)
    ap.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine")
    ap.add_argument("--loss", choices=["huber", "mse"], default="huber")
    ap.add_argument("--lora-scope", choices=["transformer", "all"], default="all")
    ap.add_argument("--cfg", type=float, default=TEACHER_CFG, help="teacher guidance baked into the LoRA")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--score-steps", type=int, default=300, help="score distillation after the TSCD stages (0: none)")
    ap.add_argument("--generator-t", type=int, default=999,
                    help="score distillation's generator timestep (999: unified LoRA; 800: one-step)")
    ap.add_argument("--fake-updates", type=int, default=1, help="fake-score updates per score-distillation step")
    ap.add_argument("--regression-weight", type=float, default=0.0, help="score distillation's regression weight")
    ap.add_argument("--score-tscd-weight", type=float, default=1.0,
                    help="weight of the TSCD term kept in the score-distillation stage (0: distribution matching alone)")
    ap.add_argument("--score-feedback-weight", type=float, default=0.5,
                    help="weight of the feedback term in the score stage (the toy reward, hypersd_toy_reward, on "
                         "the one-step generator's pictures; 0: none)")
    ap.add_argument("--margin", type=float, default=-0.05, help="the toy reward's hinge margin (log-probability)")
    ap.add_argument("--per-digit", type=int, default=50, help="training images per digit (one CLIP encode each)")
    ap.add_argument("--checkpoint-every", type=int, default=0)
    ap.add_argument("--name", default=Path(LORA_FILE).stem, help="output_name given to the node")
    ap.add_argument("--out", type=Path, default=WEIGHTS / LORA_FILE, help="where the trained LoRA is copied")
    ap.add_argument("--models-dir", type=Path, default=comfy_dir() / "models",
                    help="models folder to install the toy checkpoint into (set-up's host by default)")
    ap.add_argument("--unet", type=Path, help="use this UNet file instead of the committed teacher (pipeline tests)")
    ap.add_argument("--work-dir", type=Path, help="server base folder (default: a temporary one, removed after)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run saved in --work-dir (e.g. a finished TSCD run, with score settings added)")
    ap.add_argument("--timeout", type=float, default=4 * 3600)
    args = ap.parse_args(argv)
    if args.resume and args.work_dir is None:
        ap.error("--resume continues the run saved in --work-dir: give --work-dir")
    logging.basicConfig(level=logging.INFO, format="[train_student %(asctime)s] %(message)s", datefmt="%H:%M:%S")

    base = args.work_dir or Path(tempfile.mkdtemp(prefix="hypersd-student-"))
    base.mkdir(parents=True, exist_ok=True)
    ckpt = toy_checkpoint(args.models_dir, args.unet, base / "scratch")
    place(base, "checkpoints", ckpt.resolve())
    if args.score_feedback_weight:
        place(base, "hypersd_rewards", (WEIGHTS / REWARD_FILE).resolve())
    n = write_dataset(base / "input" / DATASET_FOLDER, args.per_digit)
    log.info("dataset: %d captioned digits in %s", n, base / "input" / DATASET_FOLDER)

    t0 = time.time()
    try:
        with ComfyServer(base) as srv:
            return _train(srv, ckpt, n, base, args, t0)
    finally:
        if args.work_dir is None:
            shutil.rmtree(base, ignore_errors=True)


def _train(srv: ComfyServer, ckpt: Path, n: int, base: Path, args, t0: float) -> int:
    """Queue the training graph, copy the LoRAs it saved to ``--out`` and beside it, print a summary."""
    graph = training_graph(ckpt.name, DATASET_FOLDER, args.name, args)
    log.info("training %s: stages %s x %d steps, batch %d, rank %d, lr %g, cfg %g, seed %d (server %s)",
             args.name, args.stages, args.steps_per_stage, args.batch, args.rank, args.lr, args.cfg, args.seed, srv.url)
    t1 = time.time()
    srv.run(graph, timeout=args.timeout)
    train_s = time.time() - t1
    loras = base / "models" / "loras"
    files.copy_file(loras / f"{args.name}.safetensors", args.out)
    stage_files = []  # the node's LoRA of each earlier stage, <name>_stage<n>_k<k>, copied beside --out
    for f in sorted(loras.glob(f"{args.name}_stage*_k*.safetensors")):
        dest = args.out.with_name(args.out.stem + f.name[len(args.name):])
        files.copy_file(f, dest)
        stage_files.append(str(dest))
    from safetensors import safe_open

    with safe_open(str(args.out), "pt") as f:
        meta = f.metadata()
    summary = {"out": str(args.out), "bytes": args.out.stat().st_size, "graph_seconds": round(train_s, 1),
               "total_seconds": round(time.time() - t0, 1), "images": n,
               "last_loss": meta.get("hypersd.last_loss"), "steps": meta.get("hypersd.total_steps"),
               "stages": meta.get("hypersd.stages"), "stage_files": stage_files}
    log.info("done: %s", json.dumps(summary))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
