"""Cost of one HyperSDTrainTSCD step beside core TrainLoraNode, on the same model and batch.

    python -m bench.bench_tscd [--channels 320] [--latent 16] [--batch 2] [--steps 6] [--rank 16]

Each configuration runs in its own process (a fresh ComfyUI, imported in-process on the
CPU, or on CUDA when available): the model is an SD1.5-shaped UNet built in memory
(``toy.arch``, one level, ``--channels`` wide), the batch ``--batch`` latents of
``--latent`` x ``--latent``. Step time = (time of ``2 + steps`` steps - time of 2 steps) /
``steps``, which removes set-up; peak memory = the highest resident set (CPU, sampled
every 2 ms) or ``torch.cuda.max_memory_allocated`` (CUDA) during the longer run, above the
level before training. Both trainers run in float32 with the same rank, with gradient
checkpointing off and on. Targets (issue 6): TSCD at most 4x the step time (it makes four
denoiser passes a step: teacher cond+uncond, EMA target, student) and at most 1.2x the
peak memory. A third row per setting is score distillation (``score_steps``; issue 12): one
TSCD step, then the timed score-distillation steps, over one TSCD step (target: at most
1.3x its peak memory, since the fake score is a third adapter, not a copy of the model).

``--quality``: the distilled toy LoRAs beside their teacher, on the toy's own quality measure
(``toy.quality.measure``: digit accuracy and FID on the digits classifier's features against
the 500 held-out digits), in-process on the CPU::

    python -m bench.bench_tscd --quality [--per-digit 50] [--repeats 2] [--train-baseline]

One TSCD run (``python -m toy.train_student``, stages 8,4,2,1) leaves a LoRA per stage: the k-step
LoRAs of the stages k = 8, 4, 2 (``<name>_stage<n>_k<k>``) and the final k = 1 LoRA
(``toy/weights/hypersd_toy_tscd_lora.safetensors``). The one-segment baseline is the same
run with k = 1 in every stage (``--stages 1,1,1,1``, same steps, batch and settings;
``--train-baseline`` trains it through the server into ``bench/out/``), so it has a LoRA at
the same training steps as each TSCD stage. Rows:

* the teacher (``euler``/``normal``) at 50 steps, at the cfg the LoRAs were distilled from
  (their metadata): the reference of every FID ratio;
* ``bare teacher``: the control. The same teacher without any LoRA at 1, 2, 4 and 8 steps
  under each few-step sampler (core ``ddim`` on the trailing grid, this pack's TCD on TCD's grid
  and on the trailing grid, core ``euler`` on ``normal``), at the same cfg; the lowest mean FID
  at each step count is its best, the row a distilled LoRA is measured against;
* ``N-step``: each TSCD LoRA at its own step count with the recipe its metadata recommends
  (k-step: this pack's TCD, eta ``--eta``, on the trailing grid, or core ``ddim`` there for a
  file that says so; k = 1: this pack's TCD at one step, eta 1), and the k-step ones also under
  the other two (DDIM trailing, TCD on TCD's grid) for comparison (the claim is the recipe's row),
  beside the one-segment LoRA with the same training steps (when it exists) sampled both with
  TCD (``--eta``, eta 1 at one step) and with DDIM trailing;
* ``unified``: the final LoRA of each run with TCD at 1, 2, 4 and 8 steps, and each file of
  ``--unified`` (a unified LoRA from score distillation: ``toy.train_student --score-steps``)
  the same way with the eta per step count its metadata recommends, checked against the
  bare teacher's best at each step count. A run whose final file is score-distilled (its
  metadata has ``score_steps``) is measured that way, its last stage file as the TSCD final.
  ``--unified-etas 0.3,0.6,1`` also samples each unified LoRA at those etas at 2, 4 and 8
  steps and says whether the eta its metadata recommends has the lowest FID there (how the
  toy's ``recommended_eta_by_steps`` is chosen).

Every row draws the same ``--per-digit`` images of each digit from the same seeds
(``--repeats`` seed sets, FID averaged). Targets (issue 11): the bare teacher at 4 steps at
least 1.5x and at 2 steps at least 2x the 50-step teacher's FID (the gap distillation
closes), and each N-step TSCD LoRA below the bare teacher's best at N steps in every seed
set. Measured rows are kept in ``bench/out/quality_rows.json`` under the digests of the
files and the settings that made them, so a rerun with the same files prints the same rows
without sampling again; ``--fresh`` measures everything anew.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import hypersd_dev
from hypersd_dev import REPO, comfy_dir
from ComfyUI_HyperSD.hypersd_core import files


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
    hypersd_dev.load_pack(cfg["threads"], cpu=cfg["device"] == "cpu")
    import tempfile

    import folder_paths
    import torch
    from comfy_extras.nodes_train import TrainLoraNode

    from ComfyUI_HyperSD.nodes import training
    from toy import arch

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
        if cfg["method"] == "score":  # one TSCD step, then `steps` score-distillation steps
            with torch.inference_mode():
                training.train_tscd(mp, [{"samples": lat}], pos, neg, stages="4", steps_per_stage=1,
                                    score_steps=steps, learning_rate=1e-4, rank=cfg["rank"], teacher_cfg=5.0, seed=0,
                                    output_name=name, checkpoint_every=0, batch_size=B, resume=False,
                                    lora_scope="all", gradient_checkpointing=cfg["gc"])
        elif cfg["method"] == "feedback":  # `steps` feedback steps on the LoRA of the warm-up's TSCD step
            from ComfyUI_HyperSD.nodes import feedback

            with torch.inference_mode():
                terms = [feedback.core_feedback.RewardTerm(reward, margin=0.0)]
                feedback.train_feedback(mp, "base.safetensors", vae, terms, [{"samples": lat}], pos, ["a digit 7"],
                                        stages="4", steps_per_stage=steps, learning_rate=1e-4, rank=cfg["rank"],
                                        seed=0, output_name=name, checkpoint_every=0, batch_size=B, resume=False,
                                        lora_scope="all", gradient_checkpointing=cfg["gc"], structure_weight=1.0)
        elif cfg["method"] == "tscd":
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

    if cfg["method"] == "feedback":  # the frozen LoRA it trains on (one TSCD step), the toy's VAE and reward
        import comfy.sd
        import comfy.utils

        from ComfyUI_HyperSD.hypersd_core import rewards as core_rewards
        from toy import train_reward

        with torch.inference_mode():
            training.train_tscd(mp, [{"samples": lat}], pos, neg, stages="4", steps_per_stage=1, learning_rate=1e-4,
                                rank=cfg["rank"], teacher_cfg=5.0, seed=0, output_name="base", checkpoint_every=0,
                                batch_size=B, resume=False, lora_scope="all")
            vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(REPO / "toy" / "weights" / "toy_vae.safetensors")))
        reward = core_rewards.load_reward(REPO / "toy" / "weights" / train_reward.REWARD_FILE)
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


# ---------------------------------------------------------------------- quality on the toy (in-process)

TOY_LORA = REPO / "toy" / "weights" / "hypersd_toy_tscd_lora.safetensors"
BASELINE_LORA = REPO / "bench" / "out" / "hypersd_toy_k1_lora.safetensors"
TEACHER_CFG = 1.5  # the guidance distilled into the toy LoRAs (toy/train_student.py), when a LoRA does not record it


def _lora_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def stage_files(final: Path) -> dict[tuple[int, int], tuple[Path, dict]]:
    """The LoRAs of one run by ``(total training steps, stages trained)``: ``{key: (path,
    metadata)}``, the stage files (``<stem>_stage<n>_k<k>``, written by the node at each stage's
    end) and the final file. The second part keeps apart a stage file that came from a run of
    its own with as many steps (the toy's 8-step LoRA: 1000 steps of one stage) and the final
    file (1000 steps over four stages), and orders the final last."""
    out = {}
    for f in sorted(final.parent.glob(final.stem + "_stage*_k*.safetensors")) + [final]:
        if f.exists():
            meta = _lora_meta(f)
            out[(int(meta["hypersd.step"]), len(meta.get("hypersd.stages", "").split(",")))] = (f, meta)
    return out


def train_baseline(student: Path, out: Path) -> None:
    """The one-segment baseline: ``python -m toy.train_student --stages 1,1,...`` with the student's
    stage count and steps per stage (one segment throughout, a file saved at every stage end)."""
    meta = _lora_meta(student)
    n_stages = len(meta["hypersd.stages"].split(","))
    cmd = [sys.executable, "-m", "toy.train_student", "--stages", ",".join(["1"] * n_stages), "--score-steps", "0",
           "--steps-per-stage", meta["hypersd.steps_per_stage"],
           "--rank", meta["hypersd.rank"], "--lr", meta["hypersd.learning_rate"], "--cfg", meta["hypersd.teacher_cfg"],
           "--seed", meta["hypersd.seed"], "--lora-scope", meta["hypersd.lora_scope"],
           "--lr-schedule", meta.get("hypersd.lr_schedule", "constant"), "--name", out.stem, "--out", str(out)]
    print("training the one-segment baseline: " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=str(REPO),
                   env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))


def score_distilled(meta: dict) -> bool:
    """Whether a file of a run holds score-distillation steps (every file of a run with
    ``score_steps`` records the setting; only those past its TSCD stages were trained by it)."""
    tscd_steps = len(meta.get("hypersd.stages", "").split(",")) * int(meta.get("hypersd.steps_per_stage", 0) or 0)
    return int(meta.get("hypersd.score_steps", 0) or 0) > 0 and int(meta.get("hypersd.step", 0)) > tscd_steps


def score_label(meta: dict) -> str:
    """`` + 100 score steps (t 800, 1 fake update, no regression)``: a file's score distillation, its
    settings named where they differ from the defaults (the ablations); empty without it."""
    from ComfyUI_HyperSD.hypersd_core import dmd

    score = int(meta.get("hypersd.score_steps", 0) or 0)
    if not score:
        return ""
    t = int(meta.get("hypersd.generator_t", dmd.GENERATOR_T_UNIFIED))
    fake = int(meta.get("hypersd.fake_updates", dmd.DEFAULT_FAKE_UPDATES))
    reg = float(meta.get("hypersd.regression_weight", dmd.DEFAULT_REGRESSION_WEIGHT))
    tscd_w = float(meta.get("hypersd.score_tscd_weight", 0.0))  # absent: distribution matching alone
    notes = ([f"t {t}"] if t != dmd.GENERATOR_T_UNIFIED else []) + \
        ([f"{fake} fake update{'s' if fake > 1 else ''}"] if fake != dmd.DEFAULT_FAKE_UPDATES else []) + \
        (["no regression" if reg == 0 else f"regression {reg:g}"] if reg != dmd.DEFAULT_REGRESSION_WEIGHT else []) + \
        (["no TSCD term" if tscd_w == 0 else f"TSCD term {tscd_w:g}"] if tscd_w != dmd.DEFAULT_SCORE_TSCD_WEIGHT else []) + \
        ([f"feedback {fb:g}"] if (fb := float(meta.get("hypersd.score_feedback_weight", 0) or 0)) else [])
    return f" + {score} score steps" + (f" ({', '.join(notes)})" if notes else "")


FEW_STEP_SAMPLERS = ("ddim", "tcd", "tcd_trailing", "euler")  # the bare teacher's few-step candidates


def how_for(sampler: str, schedule: str) -> str:
    """A k-step recipe (sampler, schedule) as a ``sampler_for`` name."""
    if sampler == "tcd":
        return "tcd_trailing" if schedule == "trailing" else "tcd"
    return "ddim"


def recipe_how(path: Path) -> str:
    """The sampler a k-step LoRA's metadata recommends, as a ``sampler_for`` name."""
    from ComfyUI_HyperSD.hypersd_core import lora_file

    info = lora_file.inspect_file(str(path))
    return how_for(info.sampler, info.schedule)


class RowCache:
    """Measured rows by what determines them (checkpoint and LoRA digests, sampler, steps, cfg,
    seeds, images per digit), in ``bench/out/quality_rows.json`` (``--cache``): a rerun with the same files
    and settings reads them back instead of sampling again (``--fresh`` ignores it)."""

    def __init__(self, path: Path, fresh: bool):
        self.path = path
        self.rows = {} if fresh or not path.exists() else json.loads(path.read_text())

    def get(self, key: str):
        return self.rows.get(key)

    def put(self, key: str, value: dict) -> None:
        # rows that another process (a --shard) wrote since are kept: read, add, write atomically
        on_disk = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.rows = {**on_disk, **self.rows, key: value}
        files.write_text(self.path, json.dumps(self.rows, indent=1, sort_keys=True) + "\n")


def merged_feedback(base: Path, feedback_file: Path, ratio: float) -> Path:
    """``base`` and the feedback LoRA at ``ratio`` merged exactly (``bench/out/feedback_merged``, made once)."""
    from safetensors.torch import load_file

    from ComfyUI_HyperSD.hypersd_core import lora_merge

    out = REPO / "bench" / "out" / "feedback_merged" / f"{feedback_file.stem}_x{ratio:g}.safetensors"
    first, second = load_file(str(base)), load_file(str(feedback_file))
    # the weights' digests, not the files': a metadata-only rewrite keeps the merged file (and its rows)
    stamp = f"{weights_digest(first)}:{weights_digest(second)}:{ratio:g}"
    if out.exists() and _lora_meta(out).get("hypersd.bench_merge") == stamp:
        return out
    files.save_safetensors(out, lora_merge.merge_cat(first, second, 1.0, ratio), {"hypersd.bench_merge": stamp})
    return out


def weights_digest(sd: dict) -> str:
    """A digest of a state dict's names and tensor bytes (its metadata left out)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def quality(args) -> int:
    hypersd_dev.load_pack(args.threads)
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import comfy.utils
    import torch

    from ComfyUI_HyperSD.hypersd_core import dmd, lora_file, metadata, schedules
    from ComfyUI_HyperSD.nodes import sampling
    from toy import data, install, quality as toy_quality

    student = Path(args.student)
    baseline = Path(args.baseline)
    if not student.exists():
        print(f"no TSCD student at {student} (train it with python -m toy.train_student): measuring the "
              f"teacher's rows only", file=sys.stderr)
    elif args.train_baseline and not baseline.exists():
        train_baseline(student, baseline)
    ckpt = install.install(Path(args.models_dir))["checkpoint"]
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=True)[:3]
    pos = [clip.encode_from_tokens_scheduled(clip.tokenize(data.PROMPT.format(d))) for d in range(10)]
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    ms = model.get_model_object("model_sampling")
    n = args.per_digit
    latent = torch.zeros(n, 4, data.LATENT, data.LATENT)
    labels = torch.arange(10).repeat_interleave(n)
    seeds = [args.seed + 1000 * r for r in range(args.repeats)]
    cache = RowCache(Path(args.cache), args.fresh)
    shard = args.shard  # (i, n): measure only rows i, i + n, ... (several processes share the cache file)
    digests = {}  # file -> its sha256 prefix, the part of a row's key that names the weights
    earlier, earlier_date = {}, ""  # --rows-from: rows of an earlier --json, by their key and by their settings
    if args.rows_from:
        before = json.loads(Path(args.rows_from).read_text())
        earlier_date = before.get("date", "?")[:10]
        got = before.get("settings", {})
        same = (got.get("per_digit"), got.get("repeats"), got.get("seed")) == (n, args.repeats, args.seed)
        for x in before["figures"]["rows"]:
            r = {k: x.get(k) for k in ("accuracy", "fid", "fids", "fid_spread", "s_per_image", "reward_logp")}
            if same:  # its sample (images per digit, seed sets) is this run's: rows of the same names are these rows
                earlier[json.dumps([x["group"], x["name"], x["steps"], x["cfg"], x["sampler"]])] = r
            if x.get("key"):
                earlier[x["key"]] = r
        if not same and not any(x.get("key") for x in before["figures"]["rows"]):
            raise SystemExit(f"--rows-from {args.rows_from}: its rows are of another sample ({got}); give this run's "
                             f"--per-digit, --repeats and --seed, or measure them again (no --only)")

    def digest(path) -> str:
        if path not in digests:
            digests[path] = install.file_hash(Path(path))[:16]
        return digests[path]

    reward_model = []  # the toy's reward (not the judge), loaded for the feedback rows

    def reward_score(images, labels) -> dict:
        if not reward_model:
            from ComfyUI_HyperSD.hypersd_core import rewards as core_rewards
            from toy import train_reward

            reward_model.append(core_rewards.load_reward(REPO / "toy" / "weights" / train_reward.REWARD_FILE))
        rw = reward_model[0]
        with torch.no_grad():
            x = images.movedim(-1, 1).float()
            return {"reward_logp": float(rw(x, labels).mean()),
                    "reward_accuracy": float((rw.classifier(x).argmax(1) == labels).float().mean())}

    def run(m, cfg, sampler, sigmas, with_reward=False):
        """Accuracy and FID of each seed set (digit d of set s uses seed s + d), and their mean
        (``with_reward``: also the toy reward's mean log-probability of the prompted digit)."""
        res = []
        scores = []
        t0 = time.perf_counter()
        for s0 in seeds:
            imgs = []
            for d in range(10):
                noise = comfy.sample.prepare_noise(latent, s0 + d)
                with torch.inference_mode():
                    out = comfy.sample.sample_custom(m, noise, cfg, sampler, sigmas, pos[d], neg, latent,
                                                     disable_pbar=True, seed=s0 + d)
                    imgs.append(vae.decode(out))
            res.append(toy_quality.measure(torch.cat(imgs)[..., :3], labels))
            if with_reward:
                scores.append(reward_score(torch.cat(imgs)[..., :3], labels))
        fids = [r["fid"] for r in res]
        out = {"accuracy": sum(r["accuracy"] for r in res) / len(res), "fid": sum(fids) / len(fids),
               "fids": fids, "fid_spread": (max(fids) - min(fids)) / 2,
               "s_per_image": (time.perf_counter() - t0) / (10 * n * len(seeds))}
        for k in (scores[0] if scores else {}):
            out[k] = sum(sc[k] for sc in scores) / len(scores)
        return out

    loaded = {}

    def with_lora(path):
        if path not in loaded:
            sd = comfy.utils.load_torch_file(str(path), safe_load=True)
            loaded[path] = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0)[0]
        return loaded[path]

    def sampler_for(how: str, steps: int, eta_table=()):
        """``tcd``: this pack's TCD on the TCD grid (the file's own eta per step count where
        ``eta_table`` gives one, else eta 1 at one step and ``--eta`` above);
        ``tcd_trailing``: this pack's TCD (``--eta``) on the DDIM trailing grid (this pack's k-step
        LoRAs' recipe, ``metadata.TRAINED_NSTEP_ETA``);
        ``ddim``: core's ddim on the trailing grid (the official N-step LoRAs' recipe);
        ``euler``: core's euler on the ``normal`` schedule (ComfyUI's default)."""
        if how == "tcd_trailing":
            return (f"tcd eta {args.eta:g} trailing", sampling.tcd_sampler(args.eta),
                    schedules.hypersd_sigmas(ms, steps, "trailing"))
        if how == "tcd":
            eta = metadata.tcd_eta(steps, eta_table or ((1, 1.0), (2, args.eta)))
            return f"tcd eta {eta:g}", sampling.tcd_sampler(eta), schedules.hypersd_sigmas(ms, steps, "tcd")
        if how.startswith("one_step"):  # a dedicated one-step generator: one LCM step from its timestep
            t = int(how.split(":")[1])
            return (f"lcm one step from t {t}", comfy.samplers.sampler_object("lcm"),
                    schedules.one_step_sigmas(ms, timestep=t).cpu())
        if how == "euler":
            return ("euler normal", comfy.samplers.sampler_object("euler"),
                    comfy.samplers.calculate_sigmas(ms, "normal", steps).cpu())
        return "ddim trailing", comfy.samplers.sampler_object("ddim"), schedules.hypersd_sigmas(ms, steps, "trailing")

    rows = []  # (group, name, steps, cfg, sampler text, training steps, result)

    def add(group, name, steps, cfg, how, lora=None, trained="", eta_table=(), with_reward=False):
        text, sampler, sigmas = sampler_for(how, steps, eta_table)
        key = json.dumps([digest(ckpt), digest(lora) if lora else None, text, steps, cfg, seeds, n]
                         + (["reward"] if with_reward else []))
        r = cache.get(key)
        skip = args.only and group.split(",")[0] not in args.only  # --only: other groups from the cache or nothing
        src = f" (from {cache.path.name})"
        if r is None and skip and earlier:  # --rows-from: the row of an earlier --json with this key or these settings
            r = earlier.get(key) or earlier.get(json.dumps([group, name, steps, cfg, text]))
            src = f" (from {Path(args.rows_from).name} of {earlier_date})"
        if r is None and (skip or shard is not None and len(rows) % shard[1] != shard[0]):
            r = {"accuracy": math.nan, "fid": math.nan, "fids": [math.nan] * len(seeds), "fid_spread": math.nan,
                 "s_per_image": math.nan}  # another shard's row: measured there, not here
            rows.append((group, name, steps, cfg, "", trained, r))
            return r
        if r is None:
            r = run(with_lora(lora) if lora else model, cfg, sampler, sigmas, with_reward)
            cache.put(key, r)
            src = ""
        r = {**r, "key": key}
        rows.append((group, name, steps, cfg, text, trained, r))
        print(f"{name} {steps} steps ({text}): {r}{src}", flush=True)
        return r

    tscd_files = stage_files(student) if student.exists() else {}
    # a run with score distillation: its final file is the unified LoRA (measured as --unified
    # files are), the TSCD result before it its last stage file
    scored = [path for path, meta in tscd_files.values() if score_distilled(meta)]
    tscd_files = {t: v for t, v in tscd_files.items() if v[0] not in scored}
    unified = scored + [p for p in args.unified if p not in scored]
    base_files = stage_files(baseline) if baseline.exists() and tscd_files else {}
    # the run's final file: the one with the most stages (a stage of its own run, such as the toy's
    # 2000-step k=8 LoRA, may have more training steps)
    final_key = max(tscd_files, key=lambda key: (key[1], key[0])) if tscd_files else None
    student_meta = tscd_files[final_key][1] if tscd_files else {}
    # the teacher at the guidance the student was distilled from (its metadata), the fair reference
    teacher_cfg = float(student_meta.get("hypersd.teacher_cfg", args.teacher_cfg))
    ref = add("teacher", "teacher", 50, teacher_cfg, "euler")["fid"]
    add("teacher", "teacher", 25, teacher_cfg, "euler")  # the demo's teacher row; the plot's 25-step point
    # The control: the bare teacher at each few-step count under each few-step sampler; its
    # best (lowest mean FID) is the row a distilled LoRA must beat at the same step count.
    best = {}
    for steps in args.few_steps:
        cands = [add("bare teacher", "teacher", steps, teacher_cfg, how) for how in FEW_STEP_SAMPLERS]
        best[steps] = min(cands, key=lambda r: r["fid"])
    checks = [(f"bare teacher at {k} steps (best sampler) FID {best[k]['fid']:.1f} >= {f:g}x teacher-50 ({f * ref:.1f})",
               best[k]["fid"] >= f * ref) for k, f in ((4, 1.5), (2, 2.0)) if k in best]

    if tscd_files and not base_files:
        print(f"no one-segment baseline at {baseline}: run with --train-baseline to train it "
              f"(about as long as the student's training)", file=sys.stderr)
    # 1. Each N-step TSCD LoRA (the stage that ended with k = N segments) with its own recipe, against
    #    the bare teacher at N steps (its best sampler) in every seed set, and beside the one-segment
    #    LoRA with the same number of training steps, sampled both ways.
    by_k = {}
    base_by_step = {key[0]: v for key, v in base_files.items()}
    for (trained, _), (path, meta) in sorted(tscd_files.items()):
        by_k[int(meta["hypersd.stages"].split(",")[-1])] = (trained, path, meta["hypersd.stages"].replace(",", "-"))
    for k in sorted(by_k):
        trained, path, stages = by_k[k]
        own = recipe_how(path) if k > 1 else "tcd"
        r = add("N-step", f"TSCD {stages}", k, 1.0, own, lora=path, trained=trained)
        for other in (("ddim", "tcd") if k > 1 else ()):  # the same LoRA with other samplers: not the claim
            if other != own:
                add("N-step", f"TSCD {stages}", k, 1.0, other, lora=path, trained=trained)
        if k in best:
            wins = [a < b for a, b in zip(r["fids"], best[k]["fids"])]
            checks.append((f"{k}-step TSCD FID {r['fid']:.1f} < bare teacher at {k} steps {best[k]['fid']:.1f} "
                           f"({r['fid'] / best[k]['fid']:.2f}x) in {sum(wins)} of {len(wins)} seed sets", all(wins)))
        if trained in base_by_step:
            rb = [add("N-step", "one-segment k=1", k, 1.0, how, lora=base_by_step[trained][0], trained=trained)
                  for how in (["tcd"] if k == 1 else ["tcd", "ddim"])]
            b = min(x["fid"] for x in rb)
            if k in (2, 4):
                checks.append((f"{k}-step TSCD FID {r['fid']:.1f} < one-segment {b:.1f} (best of its samplers, "
                               f"{trained} training steps each)", r["fid"] < b))
    # 2. The final LoRA of each run as a unified LoRA: TCD at 1 to 8 steps.
    finals = ([("TSCD " + student_meta["hypersd.stages"].replace(",", "-"), final_key[0],
                tscd_files[final_key][0])] if tscd_files else [])
    if base_files:
        finals.append(("one-segment k=1", max(base_files)[0], base_files[max(base_files)][0]))
    for name, trained, path in finals:
        for steps in (1, 2, 4, 8):
            add("unified", name + " (final)", steps, 1.0, "tcd", lora=path, trained=trained)
    # 3. Other unified LoRAs (--unified: e.g. the final TSCD LoRA continued by score distillation,
    #    toy.train_student --score-steps), TCD at 1 to 8 steps with the eta per step count their
    #    metadata gives, against the bare teacher at each step count and the TSCD final.
    for path in unified:
        meta = _lora_meta(path)
        table = tuple((int(n), float(eta)) for n, eta in lora_file.inspect_file(str(path)).eta_by_steps)  # as loaders read it
        name = f"TSCD {meta.get('hypersd.stages', '?').replace(',', '-')}{score_label(meta)} ({path.stem})"
        gen_t = int(meta.get("hypersd.generator_t", dmd.GENERATOR_T_UNIFIED))
        for steps in args.unified_steps:
            # sampled from where it was trained
            how = f"one_step:{gen_t}" if steps == 1 and gen_t != dmd.GENERATOR_T_UNIFIED else "tcd"
            r = add("unified", name, steps, 1.0, how, lora=path, trained=meta.get("hypersd.step", ""),
                    eta_table=table)
            own_eta = metadata.tcd_eta(steps, table)
            tried = {own_eta: r}
            for eta in args.unified_etas if steps > 1 else ():  # which eta the file should recommend there
                if eta not in tried:
                    tried[eta] = add("unified, other eta", name, steps, 1.0, "tcd", lora=path,
                                     trained=meta.get("hypersd.step", ""), eta_table=((steps, eta),))
            if len(tried) > 1:
                eta_best = min(tried, key=lambda e: tried[e]["fid"])
                checks.append((f"{path.stem} at {steps} steps: its eta {own_eta:g} has the "
                               f"lowest FID of etas {', '.join(f'{e:g}' for e in sorted(tried))} "
                               f"(lowest: eta {eta_best:g}, FID {tried[eta_best]['fid']:.1f})",
                               tried[eta_best] is r))
            if steps in best:
                wins = [a < b for a, b in zip(r["fids"], best[steps]["fids"])]
                checks.append((f"{path.stem} at {steps} steps FID {r['fid']:.1f} < bare teacher {best[steps]['fid']:.1f} "
                               f"({r['fid'] / best[steps]['fid']:.2f}x) in {sum(wins)} of {len(wins)} seed sets", all(wins)))

    # 4. Feedback LoRAs (--feedback: the <name>_feedback files of toy.train_feedback), merged with the LoRA
    #    they were trained on at each --feedback-ratios (0 = that LoRA alone), at its recipe, with the
    #    toy reward's own score beside the judge's accuracy and FID.
    feedback_rows = []
    for fpath in args.feedback:
        fmeta = _lora_meta(fpath)
        base_name = fmeta["hypersd.feedback_on"].split("@")[0]
        base = next((p for p in (fpath.with_name(base_name), REPO / "toy" / "weights" / base_name) if p.exists()), None)
        if base is None:
            print(f"{fpath.name}: the LoRA it was trained on ({base_name}) is neither beside it nor in toy/weights",
                  file=sys.stderr)
            return 1
        info = lora_file.inspect_file(str(base))
        unified_base = info.sampler == "tcd" and info.schedule == "tcd"
        # a k-step base: the recipe the feedback was trained and measured with (its own metadata)
        how = "tcd" if unified_base else how_for(fmeta.get("hypersd.recommended_sampler", info.sampler),
                                                 fmeta.get("hypersd.recommended_schedule", info.schedule))
        table = tuple((int(k), float(e)) for k, e in info.eta_by_steps) or ((1, 1.0), (2, args.eta))
        steps_list = args.feedback_steps if unified_base else [int(info.steps)]
        for steps in steps_list:
            before = None
            for ratio in args.feedback_ratios:
                lora = base if ratio == 0 else merged_feedback(base, fpath, ratio)
                r = add("feedback", f"{base.stem} + feedback x{ratio:g}", steps, 1.0, how, lora=lora,
                        trained=fmeta.get("hypersd.feedback_step", ""), eta_table=table, with_reward=True)
                before = r if ratio == 0 else before
                feedback_rows.append((fpath.stem, steps, ratio, r, before))

    if shard is not None:
        print(f"shard {shard[0]}/{shard[1]} done: its rows are in {cache.path}; run without --shard for the table")
        return 0
    head = ["use", "model", "steps", "cfg", "sampler", "trained steps", "accuracy", "FID", "FID / teacher-50",
            "FID / bare teacher", "s/image"]
    spread = args.repeats > 1
    body = []
    for g, nm, st, cfg, smp, tr, r in rows:
        vs_bare = "-" if g == "teacher" or st not in best else f"{r['fid'] / best[st]['fid']:.2f}x"
        if g == "bare teacher":
            vs_bare = "best" if r is best[st] else vs_bare
        body.append([g, nm, st, f"{cfg:g}", smp, tr, f"{r['accuracy']:.3f}",
                     f"{r['fid']:.1f}" + (f" ± {r['fid_spread']:.1f}" if spread else ""), f"{r['fid'] / ref:.2f}x",
                     vs_bare, f"{r['s_per_image']:.4f}"])
    text = (f"toy digits, {n} images per digit ({10 * n} per row{f', mean of {len(seeds)} seed sets (± half range)' if spread else ''}), "
            f"FID on the judge's features against the {len(data.split()['test_x'])} held-out digits, first seed "
            f"{args.seed}, {args.threads} thread(s); 'bare teacher' = the teacher without LoRA at cfg {teacher_cfg:g}, "
            f"'best' marks its lowest-FID sampler at each step count\n" + hypersd_dev.table(head, body))
    sp = data.split()
    step = max(1, len(sp["train_x"]) // (10 * n))
    real = toy_quality.measure(sp["train_x"][::step][:10 * n], sp["train_y"][::step][:10 * n])
    text += (f"\n\n{real['n']} real training digits (the reference the judge gives real pictures): accuracy "
             f"{real['accuracy']:.3f}, FID {real['fid']:.1f}")
    if feedback_rows:
        fhead = ["feedback LoRA", "steps", "merge ratio", "accuracy", "FID", "FID / before", "reward log p",
                 "reward accuracy"]
        fbody = [[name, st, f"{ratio:g}", f"{r['accuracy']:.3f}",
                  f"{r['fid']:.1f}" + (f" ± {r['fid_spread']:.1f}" if spread else ""),
                  f"{r['fid'] / b['fid']:.2f}x" if b else "-", f"{r.get('reward_logp', math.nan):.3f}",
                  f"{r.get('reward_accuracy', math.nan):.3f}"] for name, st, ratio, r, b in feedback_rows]
        text += ("\n\nFeedback learning (ratio 0 = the LoRA it was trained on; the reward is the toy's reward "
                 "model, not the judge):\n" + hypersd_dev.table(fhead, fbody))
        for name, st in sorted({(nm, st) for nm, st, *_ in feedback_rows}):
            cands = [(ratio, r, b) for nm, s2, ratio, r, b in feedback_rows if (nm, s2) == (name, st) and ratio > 0]
            ok = [(ratio, r) for ratio, r, b in cands if r["accuracy"] >= 0.95 and b and r["fid"] <= 1.1 * b["fid"]]
            tried = ", ".join(f"x{ra:g}: {r2['accuracy']:.3f} / {r2['fid'] / b2['fid']:.2f}x" for ra, r2, b2 in cands if b2)
            checks.append((f"{name} at {st} steps: a merge ratio with judge accuracy >= 0.95 and FID <= 1.1x before "
                           f"(accuracy / FID ratio: {tried})", bool(ok)))
    text += "\n\n" + "\n".join(f"{'met    ' if ok else 'NOT met'}  {what}" for what, ok in checks)
    print(text)
    files.write_text(REPO / "bench" / "out" / "tscd_quality.md", text + "\n")
    if args.json:
        from bench import results

        def row(g, nm, st, cfg, smp, tr, r):
            return {"group": g, "name": nm, "steps": st, "cfg": cfg, "sampler": smp, "trained": tr,
                    "best_bare": g == "bare teacher" and r is best.get(st), "key": r.get("key"),
                    **{k: r.get(k) for k in ("accuracy", "fid", "fids", "fid_spread", "s_per_image", "reward_logp")}}

        results.save(args.json, "quality", {
            "rows": [row(*x) for x in rows], "teacher50_fid": ref, "real": real,
            "feedback": [{"lora": nm, "steps": st, "ratio": ratio, "accuracy": r["accuracy"], "fid": r["fid"],
                          "fid_spread": r["fid_spread"], "before_fid": b["fid"] if b else None,
                          "reward_logp": r.get("reward_logp")} for nm, st, ratio, r, b in feedback_rows],
            "checks": [{"what": what, "met": bool(ok)} for what, ok in checks]},
            {"per_digit": n, "repeats": len(seeds), "seed": args.seed, "eta": args.eta,
             "few_steps": args.few_steps, "teacher_cfg": teacher_cfg}, args.quick)
    return 0


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
    ap.add_argument("--per-digit", type=int, default=50, help="--quality: images per digit and row")
    ap.add_argument("--eta", type=float, default=0.3, help="--quality: TCD eta of the students above one step")
    ap.add_argument("--seed", type=int, default=0, help="--quality: first noise seed (digit d uses seed + d)")
    ap.add_argument("--repeats", type=int, default=1, help="--quality: seed sets per row (seed + 1000 r); FID is their mean")
    ap.add_argument("--student", default=str(TOY_LORA), help="--quality: the TSCD LoRA")
    ap.add_argument("--baseline", default=str(BASELINE_LORA), help="--quality: the one-segment LoRA")
    ap.add_argument("--train-baseline", action="store_true", help="--quality: train the baseline when missing")
    ap.add_argument("--unified", type=lambda v: [Path(x) for x in v.split(",") if x.strip()], default=[],
                    help="--quality: more unified LoRAs (comma-separated files, e.g. a score-distilled one) at 1-8 steps, "
                         "TCD with the eta per step count of their metadata")
    ap.add_argument("--unified-steps", type=lambda v: [int(x) for x in v.split(",") if x.strip()], default=[1, 2, 4, 8],
                    help="--quality: the step counts each unified LoRA is measured at (e.g. 1 for a one-step ablation)")
    ap.add_argument("--unified-etas", type=lambda v: [float(x) for x in v.split(",") if x.strip()], default=[],
                    help="--quality: also sample each unified LoRA at these TCD etas at every step count (to choose "
                         "the eta its metadata recommends)")
    ap.add_argument("--feedback", type=lambda v: [Path(x) for x in v.split(",") if x.strip()], default=[],
                    help="--quality: feedback LoRAs (the <name>_feedback files of toy.train_feedback), merged with "
                         "the LoRA they were trained on at each --feedback-ratios")
    ap.add_argument("--feedback-ratios", type=lambda v: [float(x) for x in v.split(",") if x.strip()],
                    default=[0.0, 0.25, 0.5, 0.75, 1.0], help="--quality: merge ratios of the feedback rows")
    ap.add_argument("--feedback-steps", type=lambda v: [int(x) for x in v.split(",") if x.strip()], default=[1, 2, 4],
                    help="--quality: step counts of a feedback LoRA on a unified LoRA (an N-step one: N)")
    ap.add_argument("--only", type=lambda v: {x.strip() for x in v.split(",") if x.strip()}, default=set(),
                    help="--quality: measure only these row groups (teacher, bare teacher, N-step, unified, feedback); "
                         "the others come from the cache where measured (a quick look at new files)")
    ap.add_argument("--models-dir", default=str(comfy_dir() / "models"), help="--quality: where the toy is installed")
    ap.add_argument("--teacher-cfg", type=float, default=TEACHER_CFG,
                    help="--quality: the teacher's guidance when the student's metadata does not give it")
    ap.add_argument("--few-steps", type=lambda v: [int(x) for x in v.split(",") if x.strip()], default=[1, 2, 4, 8],
                    help="--quality: step counts of the bare teacher's rows, in this order (default 1,2,4,8)")
    ap.add_argument("--rows-from", help="--quality with --only: the other groups' rows, where the cache lacks them, "
                         "from this earlier --json of the bench (bench/results/quality.json) when their files' digests "
                         "match (rows written before digests were kept: when their settings and names match)")
    ap.add_argument("--cache", default=str(REPO / "bench" / "out" / "quality_rows.json"),
                    help="--quality: the file of measured rows (default bench/out/quality_rows.json)")
    ap.add_argument("--fresh", action="store_true", help="--quality: measure every row again (ignore bench/out/quality_rows.json)")
    ap.add_argument("--shard", type=lambda v: tuple(int(x) for x in v.split("/")), default=None, metavar="I/N",
                    help="--quality: measure only every N-th row from row I into the cache (run I = 0 .. N-1 side by "
                         "side, one per core, then once without --shard for the table)")
    ap.add_argument("--methods", type=lambda v: [x for x in v.split(",") if x.strip()],
                    default=["core", "tscd", "score", "feedback"],
                    help="cost table: the trainers to time (core and tscd are the references; default all)")
    ap.add_argument("--json", help="also write the figures here (bench/results.py; scripts/bench.sh does)")
    ap.add_argument("--quick", action="store_true",
                    help="a few minutes: cost 2 timed steps without score distillation; --quality 5 images per "
                         "digit and one seed set")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:  # score distillation's regression bank (25 teacher steps per run) alone takes minutes: left out
        args.steps, args.per_digit, args.repeats = min(args.steps, 2), min(args.per_digit, 5), 1
        if args.methods == ap.get_default("methods"):
            args.methods = ["core", "tscd", "feedback"]
    if args.child:
        print("RESULT " + json.dumps(_child(json.loads(args.child))), flush=True)
        return 0
    if args.shard is not None and not (len(args.shard) == 2 and 0 <= args.shard[0] < args.shard[1]):
        ap.error(f"--shard takes I/N with 0 <= I < N, for example 0/2 and 1/2; got {args.shard}")
    if args.quality:
        return quality(args)
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for gc in (False, True):
        for method in args.methods:
            cfg = {"method": method, "gc": gc, "channels": args.channels, "latent": args.latent, "batch": args.batch,
                   "steps": args.steps, "rank": args.rank, "threads": args.threads, "device": device}
            # Large blocks straight from mmap and returned at once, so the resident set follows
            # live tensors instead of what glibc keeps cached.
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_="65536",
                       MALLOC_TRIM_THRESHOLD_="0")
            out = subprocess.run([sys.executable, "-m", "bench.bench_tscd", "--child", json.dumps(cfg)],
                                 capture_output=True, text=True, env=env, cwd=str(REPO))
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
                return 1
            rows.append((method, gc, json.loads(line[0][7:])))
    print(f"device {device}, UNet {args.channels} ch (one level), batch {args.batch} x 4x{args.latent}x{args.latent}, "
          f"rank {args.rank}, float32, {args.steps} timed steps, {args.threads} thread(s)")
    print(f"{'trainer':<22}{'grad ckpt':>10}{'step (s)':>12}{'peak (MiB)':>12}{'time ratio':>12}{'mem ratio':>11}")
    ref = {gc: r for m, gc, r in rows if m == "core"}
    names = {"core": "core TrainLoraNode", "tscd": "HyperSDTrainTSCD", "score": "  score distillation",
             "feedback": "HyperSDTrainFeedback"}
    for method, gc, r in rows:
        tr = r["step_s"] / ref[gc]["step_s"]
        mr = r["peak_bytes"] / max(ref[gc]["peak_bytes"], 1)
        print(f"{names[method]:<22}{'on' if gc else 'off':>10}{r['step_s']:>12.3f}{r['peak_bytes'] / 2**20:>12.1f}"
              f"{tr:>11.2f}x{mr:>10.2f}x")
    tscd = {gc: r for m, gc, r in rows if m == "tscd"}
    print("(score distillation's target: peak memory at most 1.3x a TSCD step's; the fake score is an adapter)")
    for label, m in (("score distillation", "score"), ("feedback (decoder and reward in the graph; grad ckpt also "
                                                        "recomputes the VAE decoder)", "feedback")):
        if not any(method == m for method, _, _ in rows):
            continue
        print(f"{label} over one TSCD step:")
        for method, gc, r in rows:
            if method == m:
                print(f"  grad ckpt {'on' if gc else 'off'}: time {r['step_s'] / tscd[gc]['step_s']:.2f}x, "
                      f"peak memory {r['peak_bytes'] / max(tscd[gc]['peak_bytes'], 1):.2f}x")
    if args.json:
        from bench import results

        results.save(args.json, "training_cost" + ("_gpu" if device == "cuda" else ""), {"rows": [
            {"method": method, "trainer": names[method].strip(), "gradient_checkpointing": gc, "step_s": r["step_s"],
             "peak_mib": r["peak_bytes"] / 2**20, "time_vs_core": r["step_s"] / ref[gc]["step_s"],
             "memory_vs_core": r["peak_bytes"] / max(ref[gc]["peak_bytes"], 1)} for method, gc, r in rows]},
            {"device": device, "channels": args.channels, "latent": args.latent, "batch": args.batch,
             "steps": args.steps, "rank": args.rank, "threads": args.threads}, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
