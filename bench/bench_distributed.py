#!/usr/bin/env python3
"""The training command on 1, 2 and 4 processes (``torchrun``, gloo on this CPU machine): steps
and images per second, and whether the runs end with the same LoRA (the equivalence the test
checks on a shorter run).

    .venv/bin/python -m bench.bench_distributed [--steps 20] [--batch 8] [--procs 1,2,4] [--devices cpu,cuda]
                                                [--shard-base] [--json FILE]

Each run trains the toy teacher (``scripts.train``, stages ``1``, global batch ``--batch``, no
checkpoints) from a fresh folder; the time is the training alone (the script's
``train_seconds``: model loading and process start-up left out). On a machine with fewer cores
than processes, the processes share cores and the table shows that, not what GPUs would do.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import hypersd_dev
from hypersd_dev import REPO

CONFIG = """checkpoint = "toy"
data = "toy"
output = "bench"
out_dir = "out"
stages = "1"
steps_per_stage = {steps}
batch_size = {batch}
learning_rate = 1e-3
rank = 8
teacher_cfg = 2.0
checkpoint_every = 0
per_digit = 4
resume = false
"""


def run(procs: int, steps: int, batch: int, device: str = "cpu", shard_base: bool = False) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"hypersd-dist{procs}-"))
    text = CONFIG.format(steps=steps, batch=batch) + f"shard_base = {str(shard_base).lower()}\n"
    (folder / "run.toml").write_text(text)
    cmd = ([sys.executable, "-m", "scripts.train"] if procs == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "-m", "scripts.train"])
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, HYPERSD_DEVICE="cpu" if device == "cpu" else "gpu")
    r = subprocess.run(cmd + [str(folder / "run.toml")], cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{procs} processes failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    from safetensors.torch import load_file

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="the global batch (a multiple of every process count)")
    ap.add_argument("--procs", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2, 4])
    ap.add_argument("--devices", type=lambda v: [x.strip() for x in v.split(",") if x.strip()], default=["cpu"],
                    help="cpu (gloo), cuda (nccl, one process per GPU: larger counts are left out), or both: "
                         "cpu,cuda; the first row is the peer of every ratio")
    ap.add_argument("--shard-base", action="store_true",
                    help="also run each count above 1 with the frozen base sharded over the processes (FSDP2, "
                         "shard_base = true) beside the whole base on each (DDP over the adapters)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--quick", action="store_true", help="5 steps on 1 and 2 processes (scripts/bench.sh --quick)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.procs = 5, [1, 2]
    import torch

    if any(d not in ("cpu", "cuda") for d in args.devices):
        ap.error(f"--devices {','.join(args.devices)}: use cpu, cuda or cpu,cuda")
    if "cuda" in args.devices and not torch.cuda.is_available():
        ap.error("--devices cuda: torch sees no CUDA GPU here")
    runs = [(d, n, sharded) for d in args.devices for n in args.procs
            for sharded in ((False, True) if args.shard_base and n > 1 else (False,))
            if d == "cpu" or n <= torch.cuda.device_count()]
    rows, base = [], None
    for device, n, sharded in runs:
        s = run(n, args.steps, args.batch, device, sharded)
        lora = load_file(s["lora"], device="cpu")
        base = base or (s, lora)
        diff = max(float((lora[k] - base[1][k]).abs().max()) for k in lora)
        sps = s["steps"] / s["train_seconds"]
        rows.append({"device": device, "processes": n, "base": "sharded (FSDP2)" if sharded else "whole (DDP)",
                     "base_mib_per_process": s["base_mib_per_process"], "steps": s["steps"],
                     "train_seconds": s["train_seconds"],
                     "steps_per_second": sps, "images_per_second": sps * args.batch,
                     "speed_vs_1": sps / (base[0]["steps"] / base[0]["train_seconds"]),
                     "max_lora_difference_vs_1": diff, "losses_equal": s["losses"] == base[0]["losses"]})
    print(hypersd_dev.table(["device", "processes", "base", "base MiB / process", "steps", "train s", "steps/s",
                             "images/s", "speed / first row", "LoRA max abs diff vs first", "same losses"],
                            [[r["device"], r["processes"], r["base"], f"{r['base_mib_per_process']:.1f}", r["steps"],
                              f"{r['train_seconds']:.1f}", f"{r['steps_per_second']:.2f}",
                              f"{r['images_per_second']:.1f}", f"{r['speed_vs_1']:.2f}x",
                              f"{r['max_lora_difference_vs_1']:.1e}", r["losses_equal"]] for r in rows]))
    gpu = f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)} (nccl)" if "cuda" in args.devices else ""
    print(f"machine: {os.cpu_count()} cores (gloo, one thread per process){gpu}; global batch {args.batch}; "
          f"ratios against the first row")
    if args.json:
        from bench import results

        name = "distributed_gpu" if "cuda" in args.devices else "distributed"
        settings = {"steps": args.steps, "batch": args.batch, "devices": args.devices, "cores": os.cpu_count(),
                    "gpu": gpu.strip(", ") or None}
        results.save(args.json, name, {"rows": rows}, settings, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
