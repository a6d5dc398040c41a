#!/usr/bin/env python3
"""Distil a checkpoint into a Hyper-SD TSCD LoRA outside ComfyUI, on one process or many.

    .venv/bin/python -m scripts.train CONFIG.toml                                  (one process)
    .venv/bin/torchrun --nproc-per-node 2 -m scripts.train CONFIG.toml            (one machine)
    .venv/bin/torchrun --nnodes 2 --node-rank R --nproc-per-node 8 \\
        --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m scripts.train CONFIG.toml (several)

The config (TOML; ``hypersd_core.train_config`` lists its keys) is checked before any process
starts work: an unknown key, a value out of range or a missing path is refused with the key
named. The checkpoint is loaded with ComfyUI's own loader used as a library and trained by the
node's own function (``nodes.training.train_tscd``: ComfyUI's sampling machinery, so SD1.x,
SD2.x and SDXL with its pooled text and size conditioning, as in the node); a folder of
captioned images is encoded once by rank 0 and cached beside the output
(``<output>.latents.pt``). Under ``torchrun`` every process takes its share of each step's
global batch (``batch_size``) and the LoRA gradients are averaged (``torch.distributed``:
``nccl`` on GPUs, one process per GPU, ``gloo`` on CPUs or with ``HYPERSD_DEVICE=cpu``); rank 0
writes the LoRA, the stage LoRAs and the training state atomically, the same files the ComfyUI
node writes. With ``shard_base = true`` the frozen base is sharded over the processes (FSDP2:
each holds 1/N of it while training, for a model and training that do not fit one device
together; the model is loaded whole first) and the adapters stay whole.
With ``resume`` on, a run continues from its state, with any number of processes, sharded or
not (the global batch and the data order do not depend on either).

The command trains the TSCD stages and, with ``score_steps``, score distillation after them
(the unified LoRA; its terms split over the processes as TSCD's do); the feedback term of the
score stage and feedback runs need reward models and run in the node. The files are the
node's: with ``out_dir`` = ComfyUI's ``models/loras`` and the same settings, the node resumes
a run this command trained (adding score distillation to a finished TSCD run) and this command
finishes a run the node began; a state with other settings is refused, the setting named. The
last line printed (rank 0) is JSON: the LoRA, ``steps``, ``resumed_from`` (the step this
invocation began at), ``shard_base``, ``base_mib_per_process``, the losses.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

import hypersd_dev
from ComfyUI_HyperSD.hypersd_core import files, lora_file, lora_train, train_config
from ComfyUI_HyperSD.hypersd_core.train import Callback

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def captioned_images(folder: Path) -> list[tuple[Path, str]]:
    """(image, caption) pairs: every image with a same-name ``.txt`` beside it."""
    pairs = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            cap = p.with_suffix(".txt")
            if not cap.is_file():
                raise SystemExit(f"data: {p.name} has no caption file {cap.name} beside it")
            pairs.append((p, cap.read_text().strip()))
    if not pairs:
        raise SystemExit(f"data: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) with captions")
    return pairs


def encode_folder(folder: Path, clip, vae):
    """The folder's images and captions as the node takes them: ``(latents, positives, negative)``,
    one LATENT per caption (its images, VAE-encoded) with that caption's CONDITIONING, and the
    empty prompt's as negative."""
    import numpy as np
    from PIL import Image

    pairs = captioned_images(folder)
    captions = sorted({c for _, c in pairs})
    by_caption: dict[str, list[torch.Tensor]] = {c: [] for c in captions}
    size = None
    with torch.no_grad():
        for path, cap in pairs:
            im = Image.open(path).convert("RGB")
            if size is None:
                size = im.size
            elif im.size != size:
                raise SystemExit(f"data: {path.name} is {im.size[0]}x{im.size[1]}, the others {size[0]}x{size[1]}: "
                                 "give the images one size")
            pixels = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)[None]  # ComfyUI IMAGE layout
            by_caption[cap].append(vae.encode(pixels).float())
        positives = [clip.encode_from_tokens_scheduled(clip.tokenize(c)) for c in captions]
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latents = [{"samples": torch.cat(by_caption[c])} for c in captions]
    return latents, positives, negative


def _plain(cond) -> list:
    """A CONDITIONING with only its tensors (what ``torch.load(weights_only=True)`` reads back)."""
    return [[c, {k: v for k, v in extra.items() if isinstance(v, torch.Tensor)}] for c, extra in cond]


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        cfg = train_config.load(args[0])
    except train_config.ConfigError as e:
        print(f"config refused: {e}", file=sys.stderr)
        return 2
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    cuda, why = _use_cuda()
    if why:  # every process sees the same machine, so all of them stop here, before any waits on another
        print(f"training refused: {why}", file=sys.stderr)
        return 2
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)  # before ComfyUI is imported: its model management takes the current device
    try:
        return _train(cfg, rank, world, device)
    except ValueError as e:  # the pipeline's sentences: a state it cannot resume, a batch that does not split
        print(f"training refused: {e}", file=sys.stderr)
        return 2
    finally:
        if world > 1:
            dist.destroy_process_group()


def _use_cuda() -> tuple[bool, str | None]:
    """CUDA when torch sees it and ``HYPERSD_DEVICE`` (``hypersd_dev.device``) does not ask for
    the CPU; one process per GPU (``nccl`` cannot share one), so more processes on this machine
    than GPUs is refused with what to do instead."""
    from hypersd_dev import device as device_choice

    if device_choice.wants_cpu() or not torch.cuda.is_available():
        return False, None
    here, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
    if here > gpus:
        return True, (f"{here} processes on this machine but {gpus} GPU(s): start at most one per GPU "
                      f"(torchrun --nproc-per-node {gpus}), or set HYPERSD_DEVICE=cpu to train on the "
                      f"CPUs with gloo")
    return True, None


def _train(cfg: dict, rank: int, world: int, device) -> int:
    hypersd_dev.import_comfy(cpu=device.type == "cpu")
    import comfy.sd

    if cfg["checkpoint"] == "toy":
        from toy import install

        cfg = dict(cfg, checkpoint=str(install.install(hypersd_dev.comfy_dir() / "models")["checkpoint"]))
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(cfg["checkpoint"], output_vae=True, output_clip=True)[:3]
    out_dir = Path(cfg["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    latents, positives, negative = cached_data(cfg, out_dir, clip, vae, rank, world)
    return train_loaded(cfg, model, latents, positives, negative, rank, world)


def train_loaded(cfg: dict, model, latents, positives, negative, rank: int = 0, world: int = 1) -> int:
    """The node's training (``nodes.training.train_tscd``: ComfyUI's sampling machinery, every
    family it supports) on a loaded model, this process's share of each step, into ``out_dir``."""
    from ComfyUI_HyperSD.nodes import training

    settings = {k: cfg[k] for k in ("stages", "steps_per_stage", "learning_rate", "rank", "teacher_cfg", "seed",
                                    "batch_size", "lora_scope", "checkpoint_every", "lr_schedule")}
    settings.update({k: cfg[k] for k in train_config.SCORE_KEYS if k in cfg})  # the rest: the node's defaults
    t0 = time.perf_counter()
    first = FirstStep()
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        _, lora, trainer = training.train_tscd(model, latents, positives, negative, positive_per_latent=True,
                                               output_name=cfg["output"], resume=cfg["resume"], folder=cfg["out_dir"],
                                               shard=(rank, world), shard_base=cfg.get("shard_base", False),
                                               callbacks=(first,), **settings)
    if rank == 0:
        family = lora_file.inspect_file(lora).family
        # the base's weights this process held (sharded: its shard; the adapters are detached by now)
        base_bytes = lora_train.parameter_bytes(model.model.diffusion_model)
        print(json.dumps({"lora": lora, "steps": trainer.step, "processes": world,
                          "resumed_from": first.step if first.step is not None else trainer.step,
                          "train_seconds": round(time.perf_counter() - t0, 3), "batch_size": cfg["batch_size"],
                          "shard_base": bool(cfg.get("shard_base") and world > 1),
                          "base_mib_per_process": round(base_bytes / 2 ** 20, 3),
                          "losses": [round(x, 6) for x in trainer.history], "family": family}))
    return 0


class FirstStep(Callback):
    """The step a run began at this time: 0, or where it resumed (the total when nothing was left)."""

    step = None

    def on_step_start(self, trainer):
        if self.step is None:
            self.step = trainer.step


def cached_data(cfg: dict, out_dir: Path, clip, vae, rank: int, world: int):
    """The data folder's latents and caption conditionings: encoded once (rank 0) into
    ``<output>.latents.pt``, keyed by the images, their captions and the checkpoint; every
    process reads the cache. ``data = "toy"``: the toy's training digits, written as such a folder
    beside the output first."""
    folder = Path(cfg["data"])
    if cfg["data"] == "toy":
        from toy import data as toy_data

        folder = out_dir / f"{cfg['output']}.toy-digits-{cfg['per_digit']}"
        if rank == 0:
            toy_data.write_dataset(folder, cfg["per_digit"])
        _barrier(world)
    h = hashlib.sha256(f"v2:{cfg['checkpoint']}".encode())  # v2: LATENTs and CONDITIONINGs, as the node takes them
    for p in sorted(folder.iterdir()):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    key = h.hexdigest()[:16]
    cache = out_dir / f"{cfg['output']}.latents.pt"
    saved = None
    if rank == 0:
        saved = torch.load(cache, weights_only=True) if cache.exists() else None
        if saved is None or saved.get("key") != key:
            latents, positives, negative = encode_folder(folder, clip, vae)
            saved = {"key": key, "latents": latents, "positives": [_plain(c) for c in positives],
                     "negative": _plain(negative)}
            files.save_torch(cache, saved)
    _barrier(world)
    if saved is None:  # the other processes read what rank 0 wrote
        saved = torch.load(cache, weights_only=True)
    return saved["latents"], saved["positives"], saved["negative"]


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


if __name__ == "__main__":
    sys.exit(main())
