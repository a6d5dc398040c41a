#!/usr/bin/env python3
"""The main job's demo: the toy teacher beside few-step sampling, through a running ComfyUI.

    python -m toy.demo --url http://127.0.0.1:8188 --out out/demo      (from the repository root)

For every variant (sampler, scheduler, steps, cfg) it queues one API-format graph made of
stock nodes (``CheckpointLoaderSimple``, ``CLIPTextEncode``, ``EmptyLatentImage``,
``KSampler``, ``VAEDecode``, ``SaveImage``) that draws every digit 0-9 with the prompt
"a handwritten digit N" (empty negative), times it from the server's own execution
timestamps, fetches the images over HTTP (``/view``) and measures them with
``toy.quality``. It writes ``grid.png`` (one labelled row per variant, one column per
digit), ``table.md`` and ``results.json`` into ``--out``. Variants that use this pack's
samplers appear when the server offers them (``tcd`` / ``hypersd_tcd``), and a distilled
toy LoRA (``models/loras/hypersd_toy_*.safetensors``) joins at cfg 1 when installed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from hypersd_dev.server import Client, execution_seconds
from ComfyUI_HyperSD.hypersd_core import files, metadata

from . import data, install, quality

TEACHER_STEPS = 25
TEACHER_CFG = 2.0  # the toy teacher's guidance, the one its LoRAs were distilled from
# The bare teacher's best few-step sampler at each step count (lowest FID of DDIM trailing, TCD on
# TCD's grid and on the trailing grid, and euler in ``python -m bench.bench_tscd --quality
# --repeats 3``; at 1 and 2 steps the two TCD grids are the same): the control row beside every
# distilled LoRA, so a LoRA is shown against what lowering the steps alone gives.
CONTROL_SAMPLER = {1: "tcd", 2: "tcd", 4: "tcd_trailing", 8: "tcd_trailing"}
UNIFIED_STEPS = (1, 2, 4, 8)  # the step counts the unified LoRA is drawn at
_KSAMPLER_RECIPE = {"ddim": ("ddim", "hypersd_trailing"), "tcd": ("tcd", "hypersd_tcd"),
                    "tcd_trailing": ("tcd", "hypersd_trailing"), "euler": ("euler", "normal")}


def control_row(steps: int, cfg: float, samplers: list, schedulers: list) -> dict:
    """The toy teacher without LoRA at ``steps`` with its best few-step sampler (euler on the
    ``normal`` schedule where the server lacks this pack's schedulers)."""
    sampler, scheduler = _KSAMPLER_RECIPE[CONTROL_SAMPLER.get(steps, "ddim")]
    if sampler not in samplers or scheduler not in schedulers:
        sampler, scheduler = "euler", "normal"
    label = f"{sampler} trailing" if scheduler == "hypersd_trailing" else sampler
    return {"name": f"teacher, no LoRA, {label} {steps} steps cfg {cfg:g} (control)", "sampler": sampler,
            "scheduler": scheduler, "steps": steps, "cfg": cfg}


def variants(object_info: dict, inspect=None) -> list[dict]:
    """The demo's rows, given what the server offers.

    ``inspect(lora_name)``: the pack's ``/hypersd/inspect`` answer for a LoRA (or None). A
    toy LoRA trained by the pack runs with the recipe its metadata recommends: a k-step
    LoRA at k steps with its sampler (TCD eta 0.3, or DDIM for older files) on the trailing grid, the unified (last stage k = 1) one with TCD at 1, 2,
    4 and 8 steps, through the Hyper-SD LoRA Loader where the server has it (its sampler and
    schedule for that step count, the eta the file recommends there; else core's loader and
    the ``tcd`` KSampler sampler). Every step count a LoRA runs at is preceded by its control: the bare teacher
    at the same steps with its best few-step sampler, at the guidance the LoRAs were
    distilled from; the teacher also runs at that guidance at 25 steps.
    """
    ks = object_info["KSampler"]["input"]["required"]
    samplers, schedulers = ks["sampler_name"][0], ks["scheduler"][0]
    rows = [{"name": f"teacher euler {TEACHER_STEPS} steps cfg {TEACHER_CFG:g}", "sampler": "euler",
             "scheduler": "normal", "steps": TEACHER_STEPS, "cfg": TEACHER_CFG}]
    loras = object_info.get("LoraLoaderModelOnly", {}).get("input", {}).get("required", {}).get("lora_name", [[]])[0]
    tcd = ("tcd", "hypersd_tcd") if "tcd" in samplers and "hypersd_tcd" in schedulers else ("lcm", "sgm_uniform")
    trailing = "hypersd_trailing" if "hypersd_trailing" in schedulers else "sgm_uniform"
    by_steps: dict[int, list[dict]] = {}
    teacher_cfgs = set()
    for lora in sorted(l for l in loras if os.path.basename(l).startswith("hypersd_toy")):
        info = inspect(lora) if inspect else None
        meta = (info or {}).get("metadata") or {}
        if meta.get("hypersd.teacher_cfg"):
            teacher_cfgs.add(float(meta["hypersd.teacher_cfg"]))
        if meta.get("hypersd.feedback_only"):
            continue  # a feedback LoRA alone belongs on top of its few-step LoRA: its merged file is drawn
        label = os.path.splitext(os.path.basename(lora))[0]
        if info and info.get("variant") == "hypersd_trained" and info.get("schedule") != "tcd":
            k = int(info["steps"])  # a k-step LoRA (a stage that ended with k segments), with its recipe
            sampler = info.get("sampler") if info.get("sampler") in samplers else "ddim"
            tag = f"tcd eta {float(info.get('eta', 0.3)):g}" if sampler == "tcd" else sampler  # KSampler's tcd: eta 0.3
            by_steps.setdefault(k, []).append({"name": f"{label} {tag} trailing {k} steps cfg 1", "sampler": sampler,
                                               "scheduler": trailing, "steps": k, "cfg": 1.0, "lora": lora})
            continue
        for steps in UNIFIED_STEPS:
            row = {"name": f"{label} tcd {steps} steps cfg 1", "sampler": tcd[0], "scheduler": tcd[1],
                   "steps": steps, "cfg": 1.0, "lora": lora}
            if info and "HyperSDLoraLoader" in object_info:  # as a user runs it: the loader's sampler and eta
                eta = metadata.tcd_eta(steps, [(int(n), float(e)) for n, e in info.get("eta_by_steps") or ()])
                row.update(name=f"{label} tcd eta {eta:g} {steps} steps cfg 1 (Hyper-SD LoRA Loader)",
                           loader="HyperSDLoraLoader")
            by_steps.setdefault(steps, []).append(row)
    control_cfg = min(teacher_cfgs) if teacher_cfgs else TEACHER_CFG
    for cfg in sorted(teacher_cfgs - {TEACHER_CFG}):
        rows.append({"name": f"teacher euler {TEACHER_STEPS} steps cfg {cfg:g} (the LoRAs' teacher)",
                     "sampler": "euler", "scheduler": "normal", "steps": TEACHER_STEPS, "cfg": cfg})
    for steps in sorted(by_steps, reverse=True):
        rows.append(control_row(steps, control_cfg, samplers, schedulers))
        rows += by_steps[steps]
    return rows


def digits_graph(ckpt: str, v: dict, per_digit: int, seed: int, prefix: str) -> tuple[dict, dict[int, str]]:
    """API graph drawing ``per_digit`` images of every digit; returns it and digit -> SaveImage node id."""
    g: dict = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
    }
    model = ["ckpt", 0]
    if v.get("loader") == "HyperSDLoraLoader":
        g["lora"] = {"class_type": "HyperSDLoraLoader", "inputs": {
            "model": model, "lora_name": v["lora"], "strength": -1.0, "steps": v["steps"]}}
        model = ["lora", 0]
    elif v.get("lora"):
        g["lora"] = {"class_type": "LoraLoaderModelOnly",
                     "inputs": {"model": model, "lora_name": v["lora"], "strength_model": 1.0}}
        model = ["lora", 0]
    saves = {}
    for d in range(10):
        g[f"pos{d}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": data.PROMPT.format(d), "clip": ["ckpt", 1]}}
        g[f"lat{d}"] = {"class_type": "EmptyLatentImage", "inputs": {"width": data.SIZE, "height": data.SIZE,
                                                                      "batch_size": per_digit}}
        if v.get("loader") == "HyperSDLoraLoader":  # SamplerCustom with the loader's SAMPLER and SIGMAS
            g[f"ks{d}"] = {"class_type": "SamplerCustom", "inputs": {
                "model": model, "add_noise": True, "noise_seed": seed + d, "cfg": v["cfg"],
                "positive": [f"pos{d}", 0], "negative": ["neg", 0], "sampler": ["lora", 4], "sigmas": ["lora", 5],
                "latent_image": [f"lat{d}", 0]}}
        else:
            g[f"ks{d}"] = {"class_type": "KSampler", "inputs": {
                "model": model, "seed": seed + d, "steps": v["steps"], "cfg": v["cfg"], "sampler_name": v["sampler"],
                "scheduler": v["scheduler"], "positive": [f"pos{d}", 0], "negative": ["neg", 0],
                "latent_image": [f"lat{d}", 0], "denoise": 1.0}}
        g[f"dec{d}"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"ks{d}", 0], "vae": ["ckpt", 2]}}
        g[f"save{d}"] = {"class_type": "SaveImage", "inputs": {"images": [f"dec{d}", 0],
                                                               "filename_prefix": f"{prefix}_{d}"}}
        saves[d] = f"save{d}"
    return g, saves


def run_variant(client: Client, ckpt: str, v: dict, per_digit: int, seed: int, prefix: str) -> dict:
    import numpy as np

    g, saves = digits_graph(ckpt, v, per_digit, seed, prefix)
    t0 = time.time()
    entry = client.run(g)
    wall = time.time() - t0
    imgs, labels = [], []
    for d in range(10):
        ims = client.images(entry, saves[d])
        imgs.extend(ims)
        labels.extend([d] * len(ims))
    m = quality.measure(np.stack([np.asarray(im) for im in imgs]), labels)
    secs = execution_seconds(entry)
    if secs != secs:  # nan: no timestamps
        secs = wall
    return {**v, **m, "seconds": secs, "seconds_per_image": secs / len(imgs), "images": imgs, "labels": labels}


def write_grid(results: list[dict], path: Path, cell: int = 64) -> None:
    from PIL import Image, ImageDraw

    label_w, head_h = 340, 24
    cols = 10
    W, H = label_w + cols * cell, head_h + len(results) * cell
    grid = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(grid)
    for d in range(cols):
        draw.text((label_w + d * cell + cell // 2 - 4, 6), str(d), fill="black")
    for r, res in enumerate(results):
        y = head_h + r * cell
        text = f"{res['name']}\nacc {res['accuracy']:.2f}  FID {res['fid']:.1f}  {res['seconds_per_image'] * 1000:.0f} ms/img"
        draw.multiline_text((6, y + cell // 2 - 12), text, fill="black")
        for d in range(cols):
            first = res["labels"].index(d)
            grid.paste(res["images"][first].resize((cell, cell)), (label_w + d * cell, y))
    files.atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def write_table(results: list[dict], out: Path, meta: dict) -> tuple[Path, Path]:
    lines = [f"# Hyper-SD toy demo ({meta['per_digit']} images per digit, {meta['n']} per row; FID against "
             f"{meta['n_ref']} held-out real digits on the toy classifier's features)", "",
             "| variant | sampler | scheduler | steps | cfg | s/image | accuracy | FID |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['sampler']} | {r['scheduler']} | {r['steps']} | {r['cfg']:g} | "
                     f"{r['seconds_per_image']:.4f} | {r['accuracy']:.3f} | {r['fid']:.2f} |")
    lines += ["", f"Real digits (training split, same count) score FID {meta['real_fid']:.2f}, accuracy "
              f"{meta['real_accuracy']:.3f}."]
    md = out / "table.md"
    js = out / "results.json"
    files.write_text(md, "\n".join(lines) + "\n")
    files.write_text(js, json.dumps({"meta": meta, "rows": [{k: v for k, v in r.items() if k not in ("images", "labels")}
                                                            for r in results]}, indent=1) + "\n")
    return md, js


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8188")
    ap.add_argument("--out", type=Path, default=Path("out/demo"))
    ap.add_argument("--per-digit", type=int, default=8,
                    help="images of each digit per row (8: the main job stays within 10 minutes from a fresh clone)")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--ckpt", default=install.CHECKPOINT_NAME)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    client = Client(args.url)
    info = client.get("/object_info")
    if args.ckpt not in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]:
        print(f"[demo] the server has no checkpoint {args.ckpt}: run toy/install.py --models-dir <ComfyUI>/models",
              file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    rows = variants(info, client.inspect)
    # warm-up: load the checkpoint once so the first row's time is sampling, not loading
    warm = dict(rows[0], steps=1)
    g, _ = digits_graph(args.ckpt, warm, 1, args.seed + 777, "hypersd_toy_demo/warmup")
    client.run(g)
    results = []
    for v in rows:
        print(f"[demo] {v['name']} ...", file=sys.stderr, flush=True)
        res = run_variant(client, args.ckpt, v, args.per_digit, args.seed, "hypersd_toy_demo/" + v["name"].replace(" ", "_"))
        print(f"[demo]   accuracy {res['accuracy']:.3f}  FID {res['fid']:.2f}  {res['seconds_per_image']:.4f} s/image",
              file=sys.stderr, flush=True)
        results.append(res)
    sp = data.split()
    n = 10 * args.per_digit
    step = max(1, len(sp["train_x"]) // n)
    real = quality.measure(sp["train_x"][::step][:n], sp["train_y"][::step][:n])
    meta = {"per_digit": args.per_digit, "n": n, "n_ref": len(sp["test_x"]), "real_fid": real["fid"],
            "real_accuracy": real["accuracy"], "seed": args.seed, "checkpoint": args.ckpt}
    grid = args.out / "grid.png"
    write_grid(results, grid)
    md, js = write_table(results, args.out, meta)
    print(md.read_text())
    print(f"[demo] grid: {grid.resolve()}\n[demo] table: {md.resolve()} (and {js.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
