#!/usr/bin/env python3
"""Crash safety (issue 18, item 4): a real ComfyUI server killed with SIGKILL in the middle of a
training run's saves, and in the middle of a stream of ratings; what it leaves must be whole.

    .venv/bin/python -m bench.crash [--trials 20] [--ratings-trials 5] [--seed 0] [--keep DIR] [--json FILE]

All trials share one base folder (``ComfyServer``: ``main.py`` with the pack, the tiny SD1.5
UNet and CLIP-L of the server tests) and the server that resumed one trial is the server of the
next, so each trial costs one server start.

First an uninterrupted reference run of ``HyperSDTrainTSCD`` (stages ``2,1`` x 4 steps, batch 2,
rank 4, ``checkpoint_every`` 1: a LoRA and a training state at every step, the stage-1 LoRA at
step 4), whose every LoRA and state version is copied as it appears. Then each training trial queues the
same run under its own name and, once its first save is on disk (LoRA and state), kills the
server (SIGKILL, its child processes too) at one of three kinds of moment, in turn:

* ``between``: right after the state of save ``k`` replaced the old one, before that save's other
  files (``k`` in turn the last save, the stage's end, and a save drawn at random);
* ``write``: when a temporary file appears from save ``k`` on (``k`` drawn, the stage's end and
  the last save twice as likely), after a random 0-20 ms (about what the save's writes take on
  the 2-core machine), so inside one of its writes or between them;
* ``time``: a random time into the rest of the run.

Then, with the server dead: every ``*.safetensors`` in ``models/loras`` must open with
safetensors with every tensor's bytes where its header says (no partial file), and each of the
trial's LoRA files must equal, bit for bit, the reference run's version of the step its metadata
names (the previous complete file or the new one, nothing in between); every training state must
load. A new server on the same base lists ``models/loras`` without a temporary file, resumes the
run (``resume`` on) and must end with the reference run's LoRA and stage LoRA, bit for bit, and
metadata (the CPU run is deterministic: the pack's resume is exact).

Two replays then lay down, from the reference run's own files, what a kill between a save's
files leaves (the state of step 4 or 8, the LoRA of the step before, at step 4 no stage LoRA), so that
those two outcomes are checked whatever the timing of the kills, and resume them likewise.

Each ratings trial posts ratings to ``POST /hypersd/ratings`` from two threads, as the page does,
and kills the server at a random moment of the stream; the database must pass
``PRAGMA integrity_check`` and hold every rating that was answered 200 before the kill, and the
next server must list them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hypersd_dev
from hypersd_dev import fixtures
from hypersd_dev.server import ComfyServer, ExecutionFailed

STAGES, STEPS_PER_STAGE = "2,1", 4
TOTAL = 2 * STEPS_PER_STAGE  # steps of the run
STAGE_END = STEPS_PER_STAGE  # the step that ends stage 1 (its LoRA is saved then)
STAGE_FILE = "_stage1_k2.safetensors"
REFERENCE = "crash_reference"
KINDS = ("between", "write", "time")
STATE_SUFFIX = ".hypersd-state"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


def train_graph(parts: dict, name: str, resume: bool) -> dict:
    """The trainer alone (no sampling after it) of the server tests' short run, saving at every step."""
    g = fixtures.tscd_train_graph(parts, name, stages=STAGES, steps_per_stage=STEPS_PER_STAGE, checkpoint_every=1,
                                  resume=resume)
    return {k: v for k, v in g.items() if k not in ("7", "9")}


def rate_graph(n: int = 4) -> dict:
    """``n`` plain pictures saved by the rating node (what a rating names)."""
    g = {}
    for i in range(n):
        g[f"img{i}"] = {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1,
                                                                "color": (40 * i) * 0x010101}}
        g[f"rate{i}"] = {"class_type": "HyperSDRateImages", "inputs": {"images": [f"img{i}", 0],
                                                                        "filename_prefix": f"crash_{i}"}}
    return g


# ---------------------------------------------------------------------- files


def read_lora(path) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a safetensors file, opened with safetensors; raises ``ValueError``
    when the file is not whole: a header that runs past the end, a tensor whose bytes are not
    where and how long its shape and dtype say, data beyond the last tensor, a tensor safetensors
    cannot read or reads with another size."""
    from safetensors import safe_open

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes: shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise ValueError(f"header of {n} bytes runs past the end of the file ({size} bytes)")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    spans, end = {}, 0
    for key, entry in header.items():
        begin, stop = entry["data_offsets"]
        want = math.prod(entry["shape"]) * DTYPE_BYTES[entry["dtype"]]
        if stop - begin != want:
            raise ValueError(f"{key}: {stop - begin} bytes in the header, {want} for its shape and dtype")
        spans[key], end = stop - begin, max(end, stop)
    if 8 + n + end != size:
        raise ValueError(f"the tensors end at byte {8 + n + end}, the file at {size}")
    tensors = {}
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        if set(f.keys()) != set(spans):
            raise ValueError("safetensors lists other tensors than the header")
        for key in f.keys():
            t = f.get_tensor(key)
            if t.numel() * t.element_size() != spans[key]:
                raise ValueError(f"{key}: safetensors read {t.numel() * t.element_size()} bytes, the header says "
                                 f"{spans[key]}")
            tensors[key] = t.clone()  # safetensors maps the file: a file rewritten in place would change t
    return tensors, metadata


def lora_step(path) -> int:
    """The ``hypersd.step`` a LoRA file records (0: no file, or not readable yet)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            return int((json.loads(f.read(n)).get("__metadata__") or {}).get("hypersd.step", 0))
    except (OSError, ValueError):
        return 0


def same(a: tuple[dict, dict], b: tuple[dict, dict]) -> bool:
    """Two ``(tensors, metadata)`` equal bit for bit."""
    import torch

    return (a[1] == b[1] and a[0].keys() == b[0].keys()
            and all(a[0][k].dtype == b[0][k].dtype and torch.equal(a[0][k], b[0][k]) for k in a[0]))


def temp_files(folder: Path, name: str) -> list[str]:
    """The atomic writer's temporary files of run ``name`` (``.<file>.<random>.tmp``)."""
    return sorted(p for p in os.listdir(folder) if p.startswith(f".{name}") and p.endswith(".tmp"))


# ---------------------------------------------------------------------- results


@dataclass
class TrainingTrial:
    trial: int
    kind: str
    target_save: int | None
    killed_after_s: float = 0.0
    killed_in: str = ""  # "a write" (a temporary file left), "a save" (between a save's files), "between saves"
    state_step: int | None = None
    lora_step: int | None = None
    files_checked: int = 0
    partial: list[str] = field(default_factory=list)
    temp_left: list[str] = field(default_factory=list)
    temp_listed: list[str] = field(default_factory=list)
    lora_is_a_complete_version: bool | None = None
    state_loads: bool = False
    resumed_at: int | None = None
    resume_ok: bool = False
    resume_error: str = ""
    equal: bool = False


@dataclass
class RatingsTrial:
    trial: int
    killed_after_s: float = 0.0
    acknowledged: int = 0  # 200 answers of this trial before the kill
    kept: int = 0  # of those, in the database afterwards
    in_flight_kept: int = 0  # stored, but the answer never arrived
    acknowledged_total: int = 0  # every trial's so far
    kept_total: int = 0
    integrity: str = ""
    listed_after_restart: bool = False
    other_answers: list[str] = field(default_factory=list)  # anything but 200 before the kill


class CrashBench:
    """One base folder, the server currently up, and the reference run's files."""

    def __init__(self, base: Path, seed: int = 0, out=print):
        self.base = Path(base)
        self.rng = random.Random(seed)
        self.out = out
        self.loras = self.base / "models" / "loras"
        self.srv: ComfyServer | None = None
        self.parts: dict = {}
        self.versions: dict[int, tuple[dict, dict]] = {}  # the reference run's LoRA at each step
        self.raw_loras: dict[int, bytes] = {}  # and its files' bytes, and those of its training state
        self.raw_states: dict[int, bytes] = {}
        self.reference_stage: tuple[dict, dict] | None = None
        self.step_seconds = 0.5
        self.starts = 0
        self.images: list[dict] = []
        self.acked: dict[int, str] = {}  # every acknowledged rating: id -> prompt

    # ------------------------------------------------------------------ servers
    def start(self) -> ComfyServer:
        self.starts += 1
        srv = ComfyServer(self.base)
        srv.log_path = self.base / f"server-{self.starts:02d}.log"  # each server keeps its own log
        srv.start()
        problems = srv.pack_problems(srv.log())
        if problems:
            srv.stop()
            raise RuntimeError("the pack failed to load:\n" + "\n".join(problems))
        if not self.parts:
            self.parts = fixtures.sd15_parts(self.base)
        self.srv = srv
        return srv

    def arm(self) -> None:
        """Note the server's child processes now, so that :meth:`kill` sends its signal at once."""
        import psutil

        try:
            self._children = psutil.Process(self.srv.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            self._children = []

    def kill(self) -> None:
        """SIGKILL the server, then what it started (ComfyServer starts no process group of its own)."""
        import psutil

        srv = self.srv
        os.kill(srv.proc.pid, signal.SIGKILL)
        for c in getattr(self, "_children", []):
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass
        self._children = []
        srv.proc.wait(30)
        srv.stop()  # closes its log
        self.srv = None

    def close(self) -> None:
        if self.srv is not None:
            self.srv.stop()
            self.srv = None

    # ------------------------------------------------------------------ the reference run
    def reference(self) -> None:
        """The uninterrupted run, every version of its LoRA and state copied as it appears."""
        import io

        import torch

        srv = self.srv or self.start()
        lora, state = self.loras / f"{REFERENCE}.safetensors", self.loras / f"{REFERENCE}{STATE_SUFFIX}"
        pid = srv.post_prompt(train_graph(self.parts, REFERENCE, resume=False))
        seen, times, next_check = {}, {}, 0.0
        while True:
            for path in (lora, state):
                try:
                    with open(path, "rb") as f:  # the open file stays whole if it is replaced meanwhile
                        st = os.fstat(f.fileno())
                        if seen.get(path) == (st.st_ino, st.st_mtime_ns):
                            continue
                        seen[path] = (st.st_ino, st.st_mtime_ns)
                        raw = f.read()
                except FileNotFoundError:
                    continue
                if path == state:
                    self.raw_states[int(torch.load(io.BytesIO(raw), weights_only=True)["step"])] = raw
                    continue
                tmp = self.base / "reference-copy.safetensors"
                tmp.write_bytes(raw)
                tensors, meta = read_lora(tmp)
                step = int(meta["hypersd.step"])
                self.versions[step], self.raw_loras[step] = (tensors, meta), raw
                times.setdefault(step, time.perf_counter())
            if time.perf_counter() >= next_check:
                next_check = time.perf_counter() + 0.2
                hist = srv.get(f"/history/{pid}")
                if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                    break
            time.sleep(0.0005)
        srv.wait(pid)  # raises if it failed
        self.versions[TOTAL] = read_lora(lora)  # the final file, whatever the polling saw
        self.reference_stage = read_lora(self.loras / f"{REFERENCE}{STAGE_FILE}")
        if len(times) > 1:
            self.step_seconds = (max(times.values()) - min(times.values())) / (max(times) - min(times))
        missing = [s for s in range(1, TOTAL + 1) if s not in self.versions or s not in self.raw_states]
        self.out(f"reference run: {TOTAL} steps, {self.step_seconds:.2f} s a step; LoRA versions copied at steps "
                 f"{sorted(self.versions)}, states at {sorted(self.raw_states)}"
                 + (f" (missed {missing}: not checkable)" if missing else ""))

    # ------------------------------------------------------------------ a training trial
    def _wait(self, cond, timeout: float, period: float) -> bool:
        """Poll ``cond`` every ``period`` seconds (0: spin, to catch a moment that lasts milliseconds)."""
        deadline = time.perf_counter() + timeout
        n = 0
        while True:
            if cond():
                return True
            n += 1
            if period or n % 500 == 0:
                if time.perf_counter() > deadline:
                    return False
                if not self.srv.alive():
                    raise RuntimeError(f"the server died by itself:\n{self.srv.log()[-3000:]}")
            if period:
                time.sleep(period)

    def training_trial(self, i: int, kind: str, target: int | None = None) -> TrainingTrial:
        name = f"crash{i:02d}"
        lora, state = self.loras / f"{name}.safetensors", self.loras / f"{name}{STATE_SUFFIX}"
        stage = self.loras / f"{name}{STAGE_FILE}"
        if kind != "time" and target is None:
            target = self.rng.choice(list(range(2, TOTAL + 1)) + [STAGE_END, TOTAL])
        row = TrainingTrial(i, kind, target)
        srv = self.srv or self.start()
        srv.post_prompt(train_graph(self.parts, name, resume=False))
        if not self._wait(lambda: state.exists() and lora_step(lora) >= 1, 300, 0.01):
            raise TimeoutError(f"{name}: no first save within 300 s")
        self.arm()
        t0 = time.perf_counter()
        if kind == "time":
            time.sleep(self.rng.uniform(0.0, 0.9 * (TOTAL - 1) * self.step_seconds))
        else:
            self._wait(lambda: lora_step(lora) >= target - 1, 300, 0.002)
            if kind == "between":  # the state of save `target` has replaced the old one
                ino = os.stat(state).st_ino
                self._wait(lambda: os.stat(state).st_ino != ino, 60, 0.0)
            else:  # a temporary file of save `target` is being written
                self._wait(lambda: bool(temp_files(self.loras, name)), 60, 0.0)
                delay = self.rng.uniform(0.0, 0.02)  # a save (state, then LoRA) takes about 20 ms here
                end = time.perf_counter() + delay
                while time.perf_counter() < end:
                    pass
        self.kill()
        row.killed_after_s = time.perf_counter() - t0

        # ---- what the kill left
        row.temp_left = temp_files(self.loras, name)
        for p in sorted(self.loras.glob("*.safetensors")):
            row.files_checked += 1
            try:
                read_lora(p)
            except Exception as e:  # noqa: BLE001 - any failure to read is a partial file
                row.partial.append(f"{p.name}: {e}")
        try:
            import torch

            for p in sorted(self.loras.glob(f"*{STATE_SUFFIX}")):
                sd = torch.load(p, map_location="cpu", weights_only=True)
                if p == state:
                    row.state_step = int(sd["step"])
            row.state_loads = True
        except Exception as e:  # noqa: BLE001
            row.resume_error = f"a state does not load: {e}"
        if lora.exists() and not any(s.startswith(lora.name) for s in row.partial):
            got = read_lora(lora)
            row.lora_step = int(got[1]["hypersd.step"])
            ref = self.versions.get(row.lora_step)
            row.lora_is_a_complete_version = None if ref is None else same(got, ref)
            if stage.exists() and not any(s.startswith(stage.name) for s in row.partial):
                row.lora_is_a_complete_version = bool(row.lora_is_a_complete_version is not False
                                                      and same(read_lora(stage), self.reference_stage))
        stage_due = row.state_step is not None and row.state_step >= STAGE_END
        if row.temp_left:
            row.killed_in = "a write"
        elif row.state_step != row.lora_step or (stage_due and not stage.exists()):
            row.killed_in = "a save"
        else:
            row.killed_in = "between saves"

        # ---- a new server: its LoRA list, then the resumed run
        srv = self.start()
        listed = srv.get("/models/loras")
        row.temp_listed = [n for n in listed if n.endswith(".tmp") or Path(n).name.startswith(".")]
        self._resume(row, name)
        return row

    def replayable(self, state_step: int) -> bool:
        """Whether the reference run's state of ``state_step`` and LoRA of the step before were copied."""
        return state_step in self.raw_states and state_step - 1 in self.raw_loras

    def replay_trial(self, i: int, state_step: int) -> TrainingTrial:
        """What a kill between the files of save ``state_step`` leaves, laid down from the reference
        run's own files (its state of that step, its LoRA of the step before, the stage LoRA only if
        the stage ended before that save; so whether the kill lands there does not depend on
        timing), then resumed on the server."""
        name = f"replay{i:02d}"
        lora = self.loras / f"{name}.safetensors"
        if not self.replayable(state_step):
            return TrainingTrial(i, "replay", state_step, resume_error=(
                f"the reference run's state {state_step} or LoRA {state_step - 1} was not copied (a busy machine)"))
        (self.loras / f"{name}{STATE_SUFFIX}").write_bytes(self.raw_states[state_step])
        lora.write_bytes(self.raw_loras[state_step - 1])
        if state_step > STAGE_END:  # the stage LoRA was saved at the stage's end, before this save
            shutil.copyfile(self.loras / f"{REFERENCE}{STAGE_FILE}", self.loras / f"{name}{STAGE_FILE}")
        row = TrainingTrial(i, "replay", state_step, killed_in="a save", state_step=state_step,
                            lora_step=state_step - 1, state_loads=True, lora_is_a_complete_version=True)
        self._resume(row, name)
        return row

    def _resume(self, row: TrainingTrial, name: str) -> None:
        """Resume run ``name`` on the server; fills ``row``'s resume columns."""
        lora, stage = self.loras / f"{name}.safetensors", self.loras / f"{name}{STAGE_FILE}"
        srv = self.srv or self.start()
        start = len(srv.log())
        try:
            srv.run(train_graph(self.parts, name, resume=True), timeout=600)
        except ExecutionFailed as e:
            row.resume_error = str(e)
            return
        log = srv.log()[start:]
        marker = f"resuming {name} at step "
        if marker in log:
            row.resumed_at = int(log.split(marker, 1)[1].split("/", 1)[0])
        row.resume_ok = row.resumed_at == row.state_step and not srv.pack_problems(log)
        row.equal = (same(read_lora(lora), self.versions[TOTAL]) and stage.exists()
                     and same(read_lora(stage), self.reference_stage))

    # ------------------------------------------------------------------ a ratings trial
    def ratings_trial(self, i: int) -> RatingsTrial:
        srv = self.srv or self.start()
        if not self.images:
            entry = srv.run(rate_graph())
            self.images = [entry["outputs"][f"rate{j}"]["images"][0] for j in range(len(rate_graph()) // 2)]
        row = RatingsTrial(i)
        acked: dict[int, str] = {}
        lock, stop = threading.Lock(), threading.Event()
        first = threading.Event()

        def stream(t: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                prompt = f"crash r{i} t{t} n{n}"
                a, b = self.images[n % len(self.images)], self.images[(n + 1) % len(self.images)]
                body = {"kind": ("like", "dislike", "prefer")[n % 3], "image": a, "prompt": prompt, "seed": n,
                        "source": "bench.crash"}
                if body["kind"] == "prefer":
                    body["other"] = b
                try:
                    status, out = srv.rate(body)
                except Exception:  # noqa: BLE001 - the server is gone
                    return
                with lock:
                    if status == 200:
                        acked[int(out["rating"]["id"])] = prompt
                        first.set()
                    else:
                        row.other_answers.append(f"{status}: {str(out)[:200]}")

        threads = [threading.Thread(target=stream, args=(t,), daemon=True) for t in range(2)]
        for th in threads:
            th.start()
        if not first.wait(120):
            raise TimeoutError("no rating was answered within 120 s")
        self.arm()
        t0 = time.perf_counter()
        time.sleep(self.rng.uniform(0.05, 1.5))
        self.kill()  # every 200 a client reads was sent before this: the server sends nothing after it
        stop.set()
        for th in threads:
            th.join(60)
        row.killed_after_s = time.perf_counter() - t0
        row.acknowledged = len(acked)
        self.acked.update(acked)

        db = self.base / "user" / "hypersd" / "ratings.sqlite3"
        conn = sqlite3.connect(str(db))  # the first opening after the crash (it recovers the WAL)
        try:
            row.integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
            stored = dict(conn.execute("SELECT id, prompt FROM ratings").fetchall())
        finally:
            conn.close()
        row.kept = sum(stored.get(k) == p for k, p in acked.items())
        mine = {p for p in stored.values() if p.startswith(f"crash r{i} ")}
        row.in_flight_kept = len(mine - set(acked.values()))
        row.acknowledged_total = len(self.acked)
        row.kept_total = sum(stored.get(k) == p for k, p in self.acked.items())
        srv = self.start()
        status, listed = srv.request("GET", "/hypersd/ratings")
        row.listed_after_restart = status == 200 and listed["count"] == len(stored)
        return row


# ---------------------------------------------------------------------- the whole bench


def run(trials: int = 20, ratings_trials: int = 5, seed: int = 0, base: Path | None = None, replays: bool = True,
        out=print) -> dict:
    """The reference run, ``trials`` training trials, the two replays (``replays``) and
    ``ratings_trials`` ratings trials on one base folder (a temporary one unless given); returns
    the rows and the summary."""
    own = base is None
    base = Path(base or tempfile.mkdtemp(prefix="hypersd-crash-"))
    bench = CrashBench(base, seed=seed, out=out)
    t0 = time.perf_counter()
    rows, replayed, rrows = [], [], []
    try:
        bench.start()
        bench.reference()
        for _ in range(2):  # polling copies each version as it appears, and on a busy machine one can be
            # replaced before it is read; the run is deterministic, so running it again fills the gaps
            if not replays or all(bench.replayable(step) for step in (STAGE_END, TOTAL)):
                break
            out("reference run: a version the replays need was missed; running it again")
            bench.srv.free()  # the server's cache would answer the unchanged graph without training
            time.sleep(0.5)
            bench.reference()
        between = [TOTAL, STAGE_END, None]  # the "between" kills: the last save, the stage end, any save
        for i in range(trials):
            kind = KINDS[i % len(KINDS)]
            target = between[(i // len(KINDS)) % len(between)] if kind == "between" else None
            r = bench.training_trial(i, kind, target)
            rows.append(r)
            out(f"trial {i}: kill {kind} save {r.target_save or '-'} -> in {r.killed_in}; state {r.state_step}, LoRA "
                f"{r.lora_step}; partial {len(r.partial)}; resumed at {r.resumed_at} ok {r.resume_ok}; "
                f"equal {r.equal}" + (f"; {r.resume_error[:300]}" if r.resume_error else ""))
        for i, step in enumerate((STAGE_END, TOTAL) if replays else ()):
            r = bench.replay_trial(i, step)
            replayed.append(r)
            out(f"replay {i}: state {step}, LoRA {step - 1}, stage LoRA {step > STAGE_END} -> resumed at {r.resumed_at} ok "
                f"{r.resume_ok}; equal {r.equal}" + (f"; {r.resume_error[:300]}" if r.resume_error else ""))
        for i in range(ratings_trials):
            r = bench.ratings_trial(i)
            rrows.append(r)
            out(f"ratings trial {i}: acknowledged {r.acknowledged}, kept {r.kept}, in flight kept "
                f"{r.in_flight_kept}, integrity {r.integrity}")
    finally:
        bench.close()
        if own:
            shutil.rmtree(base, ignore_errors=True)
    return {"training": [asdict(r) for r in rows], "replayed": [asdict(r) for r in replayed],
            "ratings": [asdict(r) for r in rrows], "summary": summary(rows, replayed, rrows),
            "seconds": time.perf_counter() - t0, "step_seconds": bench.step_seconds}


def summary(rows: list[TrainingTrial], replayed: list[TrainingTrial], rrows: list[RatingsTrial]) -> dict:
    return {
        "trials": len(rows),
        "killed_in_a_write": sum(r.killed_in == "a write" for r in rows),
        "killed_in_a_save": sum(r.killed_in == "a save" for r in rows),
        "killed_between_saves": sum(r.killed_in == "between saves" for r in rows),
        "files_checked": sum(r.files_checked for r in rows),
        "partial_files": sum(len(r.partial) for r in rows),
        "temp_files_left": sum(len(r.temp_left) for r in rows),
        "temp_files_listed": sum(len(r.temp_listed) for r in rows),
        "lora_a_complete_version": sum(r.lora_is_a_complete_version is True for r in rows),
        "lora_not_a_complete_version": sum(r.lora_is_a_complete_version is False for r in rows),
        "states_load": sum(r.state_loads for r in rows),
        "resumes_ok": sum(r.resume_ok for r in rows),
        "equal_to_uninterrupted": sum(r.equal for r in rows),
        "replayed": len(replayed),
        "replayed_resumes_ok": sum(r.resume_ok for r in replayed),
        "replayed_equal": sum(r.equal for r in replayed),
        "ratings_trials": len(rrows),
        "ratings_acknowledged": sum(r.acknowledged for r in rrows),
        "ratings_kept": sum(r.kept for r in rrows),
        "ratings_in_flight_kept": sum(r.in_flight_kept for r in rrows),
        "ratings_integrity_ok": sum(r.integrity == "ok" for r in rrows),
        "ratings_listed_after_restart": sum(r.listed_after_restart for r in rrows),
        "ratings_other_answers": sum(len(r.other_answers) for r in rrows),
    }


def tables(result: dict) -> str:
    rows = result["training"] + result["replayed"]
    per_trial = hypersd_dev.table(
        ["trial", "kill", "save", "killed in", "state step", "LoRA step", "files checked", "partial", "temp left",
         "temp listed", "LoRA = a complete version", "resumed at", "resume OK", "= uninterrupted"],
        [[r["trial"], r["kind"], r["target_save"] or "-", r["killed_in"], r["state_step"], r["lora_step"],
          r["files_checked"] if r["kind"] != "replay" else "-", len(r["partial"]), len(r["temp_left"]),
          len(r["temp_listed"]), r["lora_is_a_complete_version"], r["resumed_at"], r["resume_ok"], r["equal"]]
         for r in rows])
    ratings = hypersd_dev.table(
        ["ratings trial", "killed after s", "acknowledged", "kept", "in flight, kept", "all trials: acknowledged / kept",
         "integrity_check", "listed after restart"],
        [[r["trial"], f"{r['killed_after_s']:.2f}", r["acknowledged"], r["kept"], r["in_flight_kept"],
          f"{r['acknowledged_total']} / {r['kept_total']}", r["integrity"], r["listed_after_restart"]]
         for r in result["ratings"]])
    s = result["summary"]
    totals = hypersd_dev.table(
        ["trials", "killed in a write / between a save's files / between saves", "files checked", "partial files",
         "temp files left (listed)", "LoRA = a complete version", "states load", "resumes OK",
         "= uninterrupted", "replayed: OK / equal", "ratings trials", "ratings acknowledged / kept", "integrity ok"],
        [[s["trials"], f"{s['killed_in_a_write']} / {s['killed_in_a_save']} / {s['killed_between_saves']}",
          s["files_checked"], s["partial_files"], f"{s['temp_files_left']} ({s['temp_files_listed']})",
          f"{s['lora_a_complete_version']}/{s['trials']}", s["states_load"], s["resumes_ok"],
          s["equal_to_uninterrupted"], f"{s['replayed_resumes_ok']} / {s['replayed_equal']} of {s['replayed']}",
          s["ratings_trials"], f"{s['ratings_acknowledged']} / {s['ratings_kept']}",
          f"{s['ratings_integrity_ok']}/{s['ratings_trials']}"]])
    return "\n\n".join(t for t in (per_trial, ratings if result["ratings"] else "", totals) if t)


def failures(result: dict) -> list[str]:
    """What the trials found wrong (empty: crash-safe)."""
    bad = []
    for r in result["training"] + result["replayed"]:
        name = f"{'training trial' if r['kind'] != 'replay' else 'replay'} {r['trial']} ({r['kind']} save " \
               f"{r['target_save']})"
        if r["partial"]:
            bad.append(f"{name}: partial files {r['partial']}")
        if r["temp_listed"]:
            bad.append(f"{name}: temporary files listed as LoRAs {r['temp_listed']}")
        if r["lora_is_a_complete_version"] is False:
            bad.append(f"{name}: the LoRA at step {r['lora_step']} is not the reference run's file of that step")
        if not r["state_loads"]:
            bad.append(f"{name}: {r['resume_error']}")
        if not r["resume_ok"]:
            bad.append(f"{name}: did not resume at the state's step {r['state_step']} (resumed at "
                       f"{r['resumed_at']}) {r['resume_error'][:500]}")
        if not r["equal"]:
            bad.append(f"{name}: resumed, it ends with another LoRA or stage LoRA than the uninterrupted run")
    for r in result["ratings"]:
        if r["integrity"] != "ok" or r["kept"] != r["acknowledged"] or r["kept_total"] != r["acknowledged_total"]:
            bad.append(f"ratings trial {r['trial']}: integrity {r['integrity']}, kept {r['kept']} of "
                       f"{r['acknowledged']} acknowledged ({r['kept_total']} of {r['acknowledged_total']} in all)")
        if not r["acknowledged"]:
            bad.append(f"ratings trial {r['trial']}: no rating was acknowledged before the kill")
        if not r["listed_after_restart"] or r["other_answers"]:
            bad.append(f"ratings trial {r['trial']}: listed after a restart {r['listed_after_restart']}, other "
                       f"answers {r['other_answers'][:3]}")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="training trials (kills during the saves)")
    ap.add_argument("--ratings-trials", type=int, default=5, help="ratings trials (kills during a rating stream)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, help="use this base folder and keep it (the servers' logs are in it)")
    ap.add_argument("--json", help="also write the rows here (bench/results.py)")
    ap.add_argument("--quick", action="store_true", help="3 training trials and 2 ratings trials")
    args = ap.parse_args(argv)
    if args.quick:
        args.trials, args.ratings_trials = min(args.trials, 3), min(args.ratings_trials, 2)
    result = run(args.trials, args.ratings_trials, args.seed, base=args.keep)
    print(tables(result))
    bad = failures(result)
    print(f"{result['seconds']:.0f} s; " + ("crash-safe: nothing partial, lost or unresumable" if not bad else
                                            "FOUND:\n  " + "\n  ".join(bad)))
    if args.json:
        from bench import results

        results.save(args.json, "crash", {k: result[k] for k in ("summary", "training", "replayed", "ratings")},
                     {"trials": args.trials, "ratings_trials": args.ratings_trials, "seed": args.seed},
                     quick=args.quick)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
