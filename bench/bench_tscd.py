"""Cost of one HyperSDTrainTSCD step beside core TrainLoraNode, on the same model and batch.

    python bench/bench_tscd.py [--channels 320] [--latent 16] [--batch 2] [--steps 6] [--rank 16]

Each configuration runs in its own process (a fresh ComfyUI, imported in-process on the
CPU, or on CUDA when available): the model is an SD1.5-shaped UNet built in memory
(``toy.arch``, one level, ``--channels`` wide), the batch ``--batch`` latents of
``--latent`` x ``--latent``. Step time = (time of ``2 + steps`` steps - time of 2 steps) /
``steps``, which removes set-up; peak memory = the highest resident set (CPU, sampled
every 2 ms) or ``torch.cuda.max_memory_allocated`` (CUDA) during the longer run, above the
level before training. Both trainers run in float32 with the same rank, with gradient
checkpointing off and on. Targets (issue 6): TSCD at most 4x the step time (it makes four
denoiser passes a step: teacher cond+uncond, EMA target, student) and at most 1.2x the
peak memory.

``--quality`` (the toy teacher's FID table) needs the toy digits teacher
(``models/checkpoints/hypersd_toy_digits.safetensors``); it is not part of this script yet.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFY = Path(os.environ.get("HYPERSD_COMFYUI") or REPO / ".host" / "ComfyUI")


# ---------------------------------------------------------------------- one configuration (child process)


class PeakRSS:
    """Highest resident set size seen while active (a sampling thread)."""

    def __init__(self, every=0.002):
        import psutil

        self.proc = psutil.Process()
        self.every = every
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self.t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _child(cfg: dict) -> dict:
    sys.path.insert(0, str(COMFY))
    import comfy.cli_args

    comfy.cli_args.args.cpu = cfg["device"] == "cpu"
    import utils.extra_config  # noqa: F401
    import nodes  # noqa: F401
    import torch

    torch.set_num_threads(cfg["threads"])
    import importlib.util

    spec = importlib.util.spec_from_file_location("ComfyUI_HyperSD", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ComfyUI_HyperSD"] = mod
    spec.loader.exec_module(mod)
    import tempfile

    import folder_paths
    from comfy_extras.nodes_train import TrainLoraNode

    from ComfyUI_HyperSD.nodes import training
    from ComfyUI_HyperSD.toy import arch

    tmp = tempfile.mkdtemp(prefix="hypersd-bench-")
    folder_paths.folder_names_and_paths["loras"] = ([tmp], folder_paths.supported_pt_extensions)
    with torch.inference_mode():
        mp = arch.tiny_sd15_patcher(model_channels=cfg["channels"], seed=0)
    gen = torch.Generator().manual_seed(0)
    B, L = cfg["batch"], cfg["latent"]
    lat = torch.randn(B, 4, L, L, generator=gen)
    ctx = torch.randn(1, 77, 768, generator=gen)
    pos, neg = [[ctx, {}]], [[torch.zeros_like(ctx), {}]]
    cuda = cfg["device"] == "cuda"

    def run(steps: int, name: str):
        if cfg["method"] == "tscd":
            with torch.inference_mode():
                training.train_tscd(mp, [{"samples": lat}], pos, neg, stages="4", steps_per_stage=steps,
                                    learning_rate=1e-4, rank=cfg["rank"], teacher_cfg=5.0, seed=0, output_name=name,
                                    checkpoint_every=0, batch_size=B, resume=False, lora_scope="all",
                                    gradient_checkpointing=cfg["gc"])
        else:
            with torch.inference_mode():
                TrainLoraNode.execute(
                    model=[mp], latents=[{"samples": lat[i:i + 1]} for i in range(B)], positive=[pos],
                    batch_size=[B], steps=[steps], grad_accumulation_steps=[1], learning_rate=[1e-4],
                    rank=[cfg["rank"]], optimizer=["AdamW"], loss_function=["MSE"], seed=[0],
                    training_dtype=["fp32"], lora_dtype=["fp32"], algorithm=["LoRA"],
                    gradient_checkpointing=[cfg["gc"]], existing_lora=["[None]"])

    run(1, "warm")  # imports, first-call costs
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run(2, "short")
    if cuda:
        torch.cuda.synchronize()
    t_short = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        run(2 + cfg["steps"], "long")
        if cuda:
            torch.cuda.synchronize()
        t_long = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) if cuda else (rss.peak - rss.base)
    return {"step_s": (t_long - t_short) / cfg["steps"], "peak_bytes": int(peak)}


# ---------------------------------------------------------------------- the table (parent)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, default=320)
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--quality", action="store_true", help="FID/accuracy table on the toy teacher (needs it)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(_child(json.loads(args.child))), flush=True)
        return 0
    if args.quality:
        ckpt = COMFY / "models" / "checkpoints" / "hypersd_toy_digits.safetensors"
        print(f"--quality needs the toy digits teacher ({ckpt}) and the toy quality measure; "
              "they have not landed yet, so this part is not measured.")
        return 2
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for gc in (False, True):
        for method in ("core", "tscd"):
            cfg = {"method": method, "gc": gc, "channels": args.channels, "latent": args.latent, "batch": args.batch,
                   "steps": args.steps, "rank": args.rank, "threads": args.threads, "device": device}
            # Large blocks straight from mmap and returned at once, so the resident set follows
            # live tensors instead of what glibc keeps cached.
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_="65536",
                       MALLOC_TRIM_THRESHOLD_="0")
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True,
                                 text=True, env=env, cwd=str(COMFY))
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
                return 1
            rows.append((method, gc, json.loads(line[0][7:])))
    print(f"device {device}, UNet {args.channels} ch (one level), batch {args.batch} x 4x{args.latent}x{args.latent}, "
          f"rank {args.rank}, float32, {args.steps} timed steps, {args.threads} thread(s)")
    print(f"{'trainer':<22}{'grad ckpt':>10}{'step (s)':>12}{'peak (MiB)':>12}{'time ratio':>12}{'mem ratio':>11}")
    ref = {gc: r for m, gc, r in rows if m == "core"}
    for method, gc, r in rows:
        name = "core TrainLoraNode" if method == "core" else "HyperSDTrainTSCD"
        tr = r["step_s"] / ref[gc]["step_s"]
        mr = r["peak_bytes"] / max(ref[gc]["peak_bytes"], 1)
        print(f"{name:<22}{'on' if gc else 'off':>10}{r['step_s']:>12.3f}{r['peak_bytes'] / 2**20:>12.1f}"
              f"{tr:>11.2f}x{mr:>10.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
