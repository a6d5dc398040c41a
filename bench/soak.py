#!/usr/bin/env python3
"""Soak: one real ComfyUI server, many prompts in a row, valid and invalid ones interleaved
(issue 18, item 1).

    .venv/bin/python -m bench.soak [--prompts 200] [--seed 0] [--quick] [--json FILE]

The prompts mix every node of the pack: the shipped sampling and LoRA-loader examples on
tiny stand-ins named as the official files (SD1.5 and SDXL LoRAs of the official layouts, the
diffusers one-step UNet), the Hyper-SD scheduler and TCD sampler, a short TSCD training run,
the toy's rating example (HyperSDRateImages) and a one-step feedback run with the toy reward
(HyperSDRewardLoader, HyperSDTrainFeedback); between prompts the page's routes are asked
(``/hypersd/inspect``, ``/hypersd/check``, a rating). Every seed changes from prompt to prompt, so
ComfyUI's cache never answers for a node. The invalid prompts: a LoRA of the wrong family, a
corrupt LoRA file, values out of range, a missing input, a file that is not in the list, a
path as an output name, a stage list that is no stage list.

Reported: every valid prompt succeeds; every invalid one is refused by ComfyUI's validation
with its message or fails with the pack's own sentence (an exception the pack raises, not
one from deep inside torch or ComfyUI); the server answers between all of them; its resident
memory after warm-up (the first pass over every kind) grows by at most 5 % (the median over
the last quarter of the run against the first quarter); and each kind's latency in the second
half of the run against the first (its drift), in the server's CPU seconds, which other jobs
on the machine move less than the wall time (shown beside it).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import hypersd_dev  # noqa: F401  (puts the host and this pack on the path)
from hypersd_dev import example_graphs, fixtures, workflows
from hypersd_dev.server import ComfyServer, ExecutionFailed, PromptError, is_pack_file

MEMORY_GROWTH_LIMIT = 0.05  # the bound on resident memory growth after warm-up
PACK_ERRORS = ("HyperSDError", "ValueError", "LoraFileError")  # what the pack raises on purpose, with a sentence
CORRUPT_LORA = "soak_corrupt_lora.safetensors"
QUICK_PROMPTS = 45


@dataclass
class Kind:
    name: str
    valid: bool
    build: Callable[[random.Random], dict]
    timeout: float = 300


@dataclass
class Outcome:
    kind: str
    valid: bool
    ok: bool  # valid: succeeded; invalid: refused with a message (validation) or the pack's sentence
    how: str  # success | validation | pack error | failed: ...
    seconds: float
    cpu_seconds: float  # the server process's CPU time over the prompt (less moved by other jobs than the wall time)
    rss_mb: float
    alive: bool
    message: str = ""  # the refusal's sentence (invalid prompts)
    images: list = field(default_factory=list)  # pictures a rating node showed (to rate them)


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    route_calls: int = 0
    route_failures: list[str] = field(default_factory=list)
    warmup: int = 0
    ratings_stored: int = 0
    images: list = field(default_factory=list)  # the last rated prompt's pictures

    def rss_windows(self) -> tuple[float, float]:
        """Median resident memory (MB) after the prompts of the first and of the last quarter after
        warm-up: single prompts move it by a few percent either way (a training step's buffers),
        so growth is the trend between the two windows, not one reading against another."""
        after = [o.rss_mb for o in self.outcomes[self.warmup:]]
        if not after:
            return float("nan"), float("nan")
        q = max(1, len(after) // 4)
        return statistics.median(after[:q]), statistics.median(after[-q:])

    def rss_growth(self) -> float:
        first, last = self.rss_windows()
        return (last - first) / first if first == first else 0.0

    def drift(self, what: str = "cpu_seconds") -> dict[str, float]:
        """Per valid kind: its median latency (``what``: the server's CPU seconds, or ``seconds`` of
        wall time) in the second half after warm-up / in the first half."""
        out = {}
        rest = self.outcomes[self.warmup:]
        half = len(rest) // 2
        for kind in sorted({o.kind for o in rest if o.valid}):
            a = [getattr(o, what) for o in rest[:half] if o.kind == kind and o.ok]
            b = [getattr(o, what) for o in rest[half:] if o.kind == kind and o.ok]
            if a and b and statistics.median(a) > 0:
                out[kind] = statistics.median(b) / statistics.median(a)
        return out

    def rss_delta(self) -> dict[str, float]:
        """Per kind: the mean change of resident memory (MB) over its prompts after warm-up (where a leak would show)."""
        out: dict[str, list[float]] = {}
        for prev, o in zip(self.outcomes[self.warmup:], self.outcomes[self.warmup + 1:]):
            out.setdefault(o.kind, []).append(o.rss_mb - prev.rss_mb)
        return {k: statistics.mean(v) for k, v in out.items()}

    def summary(self) -> dict:
        valid = [o for o in self.outcomes if o.valid]
        invalid = [o for o in self.outcomes if not o.valid]
        by_class: dict[str, int] = {}
        for o in invalid:
            by_class[o.how] = by_class.get(o.how, 0) + 1
        return {"prompts": len(self.outcomes), "valid": len(valid), "valid_ok": sum(o.ok for o in valid),
                "invalid": len(invalid), "invalid_refused_cleanly": sum(o.ok for o in invalid),
                "invalid_by_class": by_class, "alive_throughout": all(o.alive for o in self.outcomes),
                "route_calls": self.route_calls, "route_failures": len(self.route_failures),
                "ratings_stored": self.ratings_stored,
                "rss_after_warmup_mb": round(self.rss_windows()[0], 1), "rss_end_mb": round(self.rss_windows()[1], 1),
                "rss_peak_mb": round(max((o.rss_mb for o in self.outcomes), default=float("nan")), 1),
                "rss_growth": round(self.rss_growth(), 4),
                "cpu_drift_worst": round(max(self.drift().values(), default=1.0), 3),
                "wall_drift_worst": round(max(self.drift("seconds").values(), default=1.0), 3),
                "failures": [f"{o.kind}: {o.how}" for o in self.outcomes if not o.ok][:20]}


# ----------------------------------------------------------------------------- the prompts


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _tiny_sampling(parts: dict, rng: random.Random, **over) -> dict:
    """The pack's scheduler and TCD sampler on the tiny SD1.5 model, one latent saved."""
    sched = {"model": ["1", 0], "steps": rng.choice([1, 2, 4, 8]), "mode": rng.choice(["tcd", "trailing"]),
             "denoise": 1.0}
    sampler = {"eta": rng.choice([0.0, 0.3, 1.0])}
    sched.update(over.get("scheduler", {}))
    sampler.update(over.get("sampler", {}))
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": parts["unet"], "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": parts["clip"], "type": "stable_diffusion"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a handwritten digit 3", "clip": ["2", 0]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "HyperSDScheduler", "inputs": sched},
        "6": {"class_type": "HyperSDTCDSampler", "inputs": sampler},
        "7": {"class_type": "SamplerCustom", "inputs": {
            "model": ["1", 0], "add_noise": True, "noise_seed": rng.randrange(2**31), "cfg": 1.0, "positive": ["3", 0],
            "negative": ["3", 0], "sampler": ["6", 0], "sigmas": ["5", 0], "latent_image": ["4", 0]}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "soak"}},
    }


def _reseed(api: dict, rng: random.Random) -> dict:
    api = json.loads(json.dumps(api))
    for node in api.values():
        for key in ("seed", "noise_seed"):
            if key in node["inputs"]:
                node["inputs"][key] = rng.randrange(2**31)
    return api


def _lora_loader(parts: dict, lora: str, unet: str | None = None) -> Callable[[random.Random], dict]:
    """HyperSDLoraLoader (strength and steps from the file) on the tiny SD1.5 model, or on the
    tiny SDXL one-step UNet (``unet``: its summary only, as the SDXL examples' test)."""

    def build(rng: random.Random) -> dict:
        if unet:
            model = {"class_type": "HyperSDUNetLoader", "inputs": {"unet_name": unet, "timestep": 800}}
            return {"1": model, "2": {"class_type": "HyperSDLoraLoader", "inputs": {
                "model": ["1", 0], "lora_name": lora, "strength": -1.0, "steps": 0}},
                "9": {"class_type": "PreviewAny", "inputs": {"source": ["2", 6]}}}
        g = _tiny_sampling(parts, rng)
        g["10"] = {"class_type": "HyperSDLoraLoader", "inputs": {"model": ["1", 0], "lora_name": lora,
                                                                 "strength": -1.0, "steps": 0}}
        g["7"]["inputs"].update(model=["10", 0], sampler=["10", 4], sigmas=["10", 5], cfg=["10", 2])
        del g["5"], g["6"]
        g["11"] = {"class_type": "PreviewAny", "inputs": {"source": ["10", 6]}}
        return g

    return build


def kinds(parts: dict, object_info: dict, toy: bool) -> list[Kind]:
    from hypersd_dev.fixtures import tscd_train_graph

    out = [Kind("scheduler + TCD sampler", True, lambda rng: _tiny_sampling(parts, rng))]
    for name in sorted(example_graphs.SAMPLING):
        ui = workflows.load(example_graphs.example_path(name))
        api = fixtures.split_checkpoint(workflows.ui_to_api(ui, object_info), parts)
        out.append(Kind(f"example {name}", True, lambda rng, api=api: _reseed(api, rng)))
    for lora in fixtures.OFFICIAL_SD15:
        out.append(Kind(f"loader {lora}", True, _lora_loader(parts, lora)))
    for lora in fixtures.OFFICIAL_SDXL:
        out.append(Kind(f"loader {lora} (one-step UNet)", True, _lora_loader(parts, lora, fixtures.ONESTEP_UNET)))
    out.append(Kind("TSCD training (2 steps)", True, lambda rng: tscd_train_graph(
        parts, "soak_tscd", steps_per_stage=1, seed=rng.randrange(2**31), resume=False), timeout=600))
    if toy:
        rate = workflows.ui_to_api(workflows.load(example_graphs.example_path("hypersd_toy_rate_images")), object_info)
        out.append(Kind("toy rate images", True, lambda rng: _reseed(rate, rng)))
        fb = workflows.ui_to_api(workflows.load(example_graphs.example_path("hypersd_toy_train_feedback")), object_info)
        fb["5"]["inputs"].update(steps=1, batch_size=2, checkpoint_every=0, output_name="soak_feedback", resume=False)
        fb["7"]["inputs"]["batch_size"] = 1

        def feedback(rng, fb=fb):
            g = _reseed(fb, rng)
            g["5"]["inputs"]["seed"] = rng.randrange(2**16)
            return g

        out.append(Kind("toy feedback training (1 step)", True, feedback, timeout=600))
    # the invalid ones
    out += [
        Kind("invalid: SDXL LoRA on an SD1.5 model", False, _lora_loader(parts, fixtures.OFFICIAL_SDXL[0])),
        Kind("invalid: corrupt LoRA file", False, _lora_loader(parts, CORRUPT_LORA)),
        Kind("invalid: eta out of range", False, lambda rng: _tiny_sampling(parts, rng, sampler={"eta": 1.5})),
        Kind("invalid: steps out of range", False, lambda rng: _tiny_sampling(parts, rng, scheduler={"steps": 0})),
        Kind("invalid: missing input", False, lambda rng: _drop(_tiny_sampling(parts, rng), "5", "model")),
        Kind("invalid: file not in the list", False, _lora_loader(parts, "no_such_lora.safetensors")),
        Kind("invalid: a path as output name", False, lambda rng: tscd_train_graph(
            parts, "../soak_escape", steps_per_stage=1, resume=False)),
        Kind("invalid: stages that are no stage list", False, lambda rng: tscd_train_graph(
            parts, "soak_bad_stages", stages="8,x", steps_per_stage=1, resume=False)),
    ]
    return out


def _drop(g: dict, node: str, key: str) -> dict:
    del g[node]["inputs"][key]
    return g


def _pack_raised(error: dict) -> bool:
    """The failure is the pack's own sentence: an exception type it raises on purpose, raised in its own code."""
    tb = "".join(error.get("traceback") or [])
    frames = re.findall(r'File "([^"]+)"', tb)
    return (error.get("exception_type", "").rsplit(".", 1)[-1] in PACK_ERRORS and bool(frames)
            and is_pack_file(frames[-1]) and len(error.get("exception_message", "")) > 20)


def run_one(srv: ComfyServer, kind: Kind, rng: random.Random) -> Outcome:
    graph = kind.build(rng)
    t0, c0 = time.time(), _cpu_seconds(srv.proc.pid)
    message, images = "", []
    try:
        entry = srv.run(graph, timeout=kind.timeout)
        how = "success"
        ok = kind.valid
        images = [im for out in entry.get("outputs", {}).values() if "hypersd_rating" in out
                  for im in out.get("images", [])]
    except PromptError as e:
        how = "validation"  # ComfyUI refused it before anything ran, with its node errors
        errors = [f"{err.get('message')}: {err.get('details')}" for node in (e.body.get("node_errors") or {}).values()
                  for err in node.get("errors", [])] or [(e.body.get("error") or {}).get("message")]
        message = "; ".join(str(m) for m in errors if m)
        ok = not kind.valid and bool(message)
    except ExecutionFailed as e:
        message = str(e.error.get("exception_message", "")).strip()
        if _pack_raised(e.error):
            how = "pack error"
            ok = not kind.valid
        else:
            how = f"failed: {e.error.get('exception_type')}: {message[:200]}"
            ok = False
    seconds = time.time() - t0
    alive = srv.alive()
    cpu = _cpu_seconds(srv.proc.pid) - c0 if alive else float("nan")
    return Outcome(kind.name, kind.valid, ok, how, seconds, cpu, _rss_mb(srv.proc.pid) if alive else float("nan"),
                   alive, message, images)


def ask_routes(srv: ComfyServer, rng: random.Random, report: Report) -> None:
    """What the page asks between prompts: inspection, the badge check, one rating."""
    lora = rng.choice(fixtures.OFFICIAL_SD15 + fixtures.OFFICIAL_SDXL)
    calls = [("GET", f"/hypersd/inspect?lora={lora}", None, 200),
             ("GET", f"/hypersd/inspect?lora={CORRUPT_LORA}", None, 422),
             ("GET", "/hypersd/inspect?lora=../../etc/passwd", None, 400),
             ("POST", "/hypersd/check", {"lora": lora, "strength": 1.0, "samplers": [
                 {"id": 3, "steps": rng.choice([1, 4, 8]), "cfg": 1.0, "sampler": "ddim", "scheduler": "sgm_uniform"}]}, 200),
             ("POST", "/hypersd/ratings", {"kind": "like", "prompt": "a rating without its picture"}, 400)]
    if report.images:  # a picture the rating node showed: rated as the page does
        calls.append(("POST", "/hypersd/ratings", {"kind": rng.choice(["like", "dislike"]),
                                                   "image": rng.choice(report.images),
                                                   "prompt": "a handwritten digit 7"}, 200))
    for method, path, body, want in calls:
        report.route_calls += 1
        status, answer = srv.request(method, path, body)
        if status != want:
            report.route_failures.append(f"{method} {path}: {status} {str(answer)[:200]}")
        elif path == "/hypersd/ratings" and status == 200:
            report.ratings_stored += 1


def soak(srv: ComfyServer, prompts: int, seed: int = 0, toy: bool = True, log=print) -> Report:
    """``prompts`` prompts on ``srv``: the first pass over every kind is the warm-up, then the kinds
    drawn at random (valid ones three times as often as invalid ones)."""
    rng = random.Random(seed)
    object_info = srv.get("/object_info")
    all_kinds = kinds(setup(srv, toy), object_info, toy)
    report = Report(warmup=len(all_kinds))
    valid = [k for k in all_kinds if k.valid]
    invalid = [k for k in all_kinds if not k.valid]
    order = list(all_kinds)
    while len(order) < prompts:
        order.append(rng.choice(valid) if rng.random() < 0.75 else rng.choice(invalid))
    for i, kind in enumerate(order[:max(prompts, len(all_kinds))]):
        outcome = run_one(srv, kind, rng)
        report.outcomes.append(outcome)
        report.images = outcome.images or report.images
        if not outcome.alive:
            log(f"[soak] the server died at prompt {i} ({kind.name})")
            break
        ask_routes(srv, rng, report)
        if not outcome.ok:
            log(f"[soak] prompt {i} {kind.name}: {outcome.how}")
    return report


def setup(srv: ComfyServer, toy: bool = True) -> dict:
    """The stand-in models in the server's folders (and the toy family when ``toy``), a corrupt LoRA."""
    parts = fixtures.example_parts(srv.base)
    (srv.base / "models" / "loras" / CORRUPT_LORA).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    if toy:
        fixtures.place_toy(srv.base, (example_graphs.TOY_UNIFIED_LORA, example_graphs.TOY_K4_LORA))
    return parts


def kind_rows(report: Report) -> list[dict]:
    """One row per kind of prompt: how many, how they ended, the median time, the drift."""
    drift, wall, rss = report.drift(), report.drift("seconds"), report.rss_delta()
    out = []
    for name in dict.fromkeys(o.kind for o in report.outcomes):
        mine = [o for o in report.outcomes if o.kind == name]
        hows: dict[str, int] = {}
        for o in mine:
            hows[o.how] = hows.get(o.how, 0) + 1
        out.append({"kind": name, "valid": mine[0].valid, "prompts": len(mine), "as_expected": sum(o.ok for o in mine),
                    "how": hows, "median_s": statistics.median(o.seconds for o in mine),
                    "median_cpu_s": statistics.median(o.cpu_seconds for o in mine), "drift": drift.get(name),
                    "wall_drift": wall.get(name), "rss_delta_mb": rss.get(name),
                    "refusal": "" if mine[0].valid else mine[0].message[:90].replace("|", "/").replace("\n", " ")})
    return out


def markdown_rows(rows: list[dict]) -> list[str]:
    def x(v):
        return "-" if v is None else f"{v:.2f}x"

    out = ["| kind | valid | prompts | as expected | how (count) | median s (wall / CPU) | drift (CPU / wall) "
           "| memory change per prompt | refusal (first) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = "-" if r.get("rss_delta_mb") is None else f"{r['rss_delta_mb']:+.1f} MB"
        out.append(f"| {r['kind']} | {'yes' if r['valid'] else 'no'} | {r['prompts']} | {r['as_expected']} | "
                   + ", ".join(f"{h} ({n})" for h, n in r["how"].items())
                   + f" | {r['median_s']:.2f} / {r.get('median_cpu_s', float('nan')):.2f} | {x(r['drift'])} / "
                   + f"{x(r.get('wall_drift'))} | {mem} | {r['refusal']} |")
    return out


def table(report: Report) -> str:
    rows = markdown_rows(kind_rows(report))
    s = report.summary()
    rows.append("")
    rows.append(f"{s['prompts']} prompts ({s['valid']} valid: {s['valid_ok']} succeeded; {s['invalid']} invalid: "
                f"{s['invalid_refused_cleanly']} refused with a message), {s['route_calls']} route calls "
                f"({s['route_failures']} unexpected answers, {s['ratings_stored']} ratings stored); server alive throughout: {s['alive_throughout']}; "
                f"resident memory (median over a quarter of the run) {s['rss_after_warmup_mb']} MB after warm-up, "
                f"{s['rss_end_mb']} MB at the end ({100 * s['rss_growth']:+.1f} %, limit "
                f"+{100 * MEMORY_GROWTH_LIMIT:.0f} %), peak {s['rss_peak_mb']} MB")
    return "\n".join(rows)


def passed(report: Report) -> bool:
    s = report.summary()
    return (s["valid_ok"] == s["valid"] and s["invalid_refused_cleanly"] == s["invalid"] and s["alive_throughout"]
            and not s["route_failures"] and s["rss_growth"] <= MEMORY_GROWTH_LIMIT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-toy", action="store_true", help="leave out the toy's rating and feedback prompts")
    ap.add_argument("--quick", action="store_true", help="45 prompts (the CI test's length)")
    ap.add_argument("--json", type=Path, help="write the result file here (bench/results format)")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts = QUICK_PROMPTS
    hypersd_dev.load_pack()  # the tiny stand-ins are built with ComfyUI's own model classes
    base = Path(tempfile.mkdtemp(prefix="hypersd-soak-"))
    t0 = time.time()
    try:
        with ComfyServer(base) as srv:
            report = soak(srv, args.prompts, args.seed, toy=not args.no_toy)
            problems = srv.pack_problems(srv.log())
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    print(table(report))
    summary = report.summary()
    summary["seconds"] = round(time.time() - t0, 1)
    summary["pack_tracebacks_in_log"] = len(problems)  # the invalid prompts' deliberate errors included
    print(json.dumps(summary, indent=1))
    if args.json:
        from bench import results

        summary["kinds"] = kind_rows(report)
        summary["rss_mb_every_prompt"] = [round(o.rss_mb) for o in report.outcomes]
        results.save(args.json, "soak", summary, {"prompts": args.prompts, "seed": args.seed, "toy": not args.no_toy},
                     quick=args.quick)
    return 0 if passed(report) else 1


if __name__ == "__main__":
    sys.exit(main())
