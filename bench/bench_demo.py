#!/usr/bin/env python3
"""The main job's demo as a benchmark: its grid and table, for the results page.

    .venv/bin/python -m bench.bench_demo [--per-digit 8] [--out bench/results/demo] [--json FILE]

Starts a real ComfyUI (``main.py --cpu``) in a temporary folder with the toy family installed
(as set-up installs it), runs ``toy.demo`` against it (the teacher at 25 steps, then every
step count's control, the bare teacher with its best few-step sampler, and the toy's LoRAs
with their own recipes, the same seeds in every row), and keeps its labelled grid and table
in ``--out``. ``--json`` records the rows (accuracy, FID, seconds per image) for the page.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from hypersd_dev import REPO
from hypersd_dev.server import ComfyServer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-digit", type=int, default=8, help="pictures of each digit per row (the main job's 8)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "demo")
    ap.add_argument("--json", help="also write the rows here (bench/results.py; scripts/bench.sh does)")
    ap.add_argument("--quick", action="store_true", help="2 pictures of each digit per row")
    args = ap.parse_args(argv)
    if args.quick:
        args.per_digit = min(args.per_digit, 2)
    from toy import install

    base = Path(tempfile.mkdtemp(prefix="hypersd-bench-demo-"))
    try:
        install.install(base / "models")
        with ComfyServer(base) as srv:
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            proc = subprocess.run([sys.executable, "-m", "toy.demo", "--url", srv.url, "--out", str(args.out),
                                   "--per-digit", str(args.per_digit)], cwd=str(REPO), env=env)
            if proc.returncode != 0:
                return proc.returncode
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        from bench import results

        doc = json.loads((args.out / "results.json").read_text())
        grid = args.out / "grid.png"
        results.save(args.json, "demo", {"results": doc, "grid": os.path.relpath(grid, Path(args.json).parent)},
                     {"per_digit": args.per_digit}, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
