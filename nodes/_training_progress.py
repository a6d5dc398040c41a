"""Training progress in ComfyUI: the progress bar, the node's chart, the console, and Cancel.

Each training node's run is kept (:data:`RUNS`, by node id; the last :data:`MAX_RUNS` runs):
its per-step loss and learning rate, where each stage began, the time, how it ended and the
files it saved. The page draws it as a chart inside the node from ``hypersd.train.progress``
messages (the steps since the last message, so the chart has every step) and asks
``GET /hypersd/train/runs/{node}`` after a reload (``routes``).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import comfy.model_management
import comfy.utils

from ..hypersd_core.train import Callback

log = logging.getLogger(__name__)

PROGRESS_EVENT = "hypersd.train.progress"  # the page's chart follows it
LOG_EVERY_S = 10.0  # how often training progress is written to the console log
TEXT_EVERY_S = 0.25  # how often the page is told
MAX_POINTS = 4000  # per run; a longer run keeps every other point when it gets there
MAX_RUNS = 16

RUNS: "OrderedDict[str, RunLog]" = OrderedDict()
T = TypeVar("T")
_lock = threading.Lock()


class RunLog:
    """One run of a training node, as the page draws it."""

    def __init__(self, node_id: str, label: str, total: int, start: int):
        self.node_id, self.label, self.total, self.start = node_id, label, total, start
        self.started = time.time()
        self.step = start
        self.points: list[list] = []  # [step, loss, lr]
        self.stages: list[list] = []  # [first step, name]
        self.stride = 1  # every stride-th step is kept
        self.status = "running"  # running | done | cancelled | failed
        self.message = ""
        self.files: list[str] = []
        self.rate = 0.0  # steps a second

    def add(self, step: int, loss: float, lr) -> None:
        self.step = step
        if step % self.stride:
            return
        self.points.append([step, loss if math.isfinite(loss) else None, lr])
        if len(self.points) > MAX_POINTS:
            self.stride *= 2
            self.points = [p for p in self.points if p[0] % self.stride == 0]

    def eta_s(self) -> float | None:
        if self.status != "running" or self.rate <= 0:
            return None
        return (self.total - self.step) / self.rate

    def to_json(self, since: int = 0) -> dict:
        """The run; ``since``: only the points after that step."""
        return {"node": self.node_id, "label": self.label, "total": self.total, "start": self.start,
                "step": self.step, "started": self.started, "elapsed_s": time.time() - self.started,
                "eta_s": self.eta_s(), "rate": self.rate, "status": self.status, "message": self.message,
                "files": list(self.files), "stages": [list(s) for s in self.stages], "stride": self.stride,
                "points": [list(p) for p in self.points if p[0] > since]}


def run_json(node_id) -> dict | None:
    with _lock:
        run = RUNS.get(str(node_id))
        return run.to_json() if run else None


def runs_json() -> dict:
    with _lock:
        return {k: r.to_json(since=r.step) for k, r in RUNS.items()}  # without their points


class ComfyProgress(Callback):
    """Moves the node's progress bar, keeps the run's log and sends it to the page, writes the
    console, honours Cancel. The node calls :meth:`finish` with the files it saved, or
    :meth:`fail` when the run stops."""

    def __init__(self, node_id, label: str = "HyperSD TSCD"):
        self.node_id = node_id
        self.label = label
        self.pbar = None
        self.run: RunLog | None = None
        self._last_text = 0.0
        self._last_log = 0.0
        self._sent_step = -1

    def on_run_start(self, trainer):
        self.total, self.start, self.t0 = trainer.total_steps, trainer.step, time.monotonic()
        self.pbar = comfy.utils.ProgressBar(max(self.total, 1))
        if self.start:
            self.pbar.update_absolute(self.start, max(self.total, 1))
        self.run = RunLog(str(self.node_id), self.label, self.total, self.start)
        self._sent_step = self.start
        if self.start:  # a resumed run: where its stages began, before this start
            for i, first in enumerate(trainer.starts):
                if first < self.start and trainer.stages[i].steps > 0:
                    self.run.stages.append([first, trainer.stages[i].name])
        if self.node_id is not None:
            with _lock:
                RUNS.pop(str(self.node_id), None)
                RUNS[str(self.node_id)] = self.run
                while len(RUNS) > MAX_RUNS:
                    RUNS.popitem(last=False)

    def on_stage_start(self, trainer, index, stage):
        if self.run is not None:
            with _lock:
                self.run.stages.append([trainer.step, stage.name])

    def on_step_start(self, trainer):
        comfy.model_management.throw_exception_if_processing_interrupted()

    def on_step_end(self, trainer, loss, logs):
        self.pbar.update_absolute(trainer.step, max(self.total, 1))
        now = time.monotonic()
        rate = (trainer.step - self.start) / max(now - self.t0, 1e-9)
        with _lock:
            self.run.add(trainer.step, float(loss), logs.get("lr"))
            self.run.rate = rate
        if now - self._last_text < TEXT_EVERY_S and trainer.step < self.total:
            return
        self._last_text = now
        text = f"step {trainer.step}/{self.total} · {logs.get('stage', '')} · loss {loss:.5f} · {rate:.2f} it/s"
        if now - self._last_log >= LOG_EVERY_S or trainer.step >= self.total:
            self._last_log = now
            log.info("%s: %s", self.label, text)
        self._send(text)

    def _send(self, text: str | None = None) -> None:
        if self.node_id is None or self.run is None:
            return
        with _lock:
            event = self.run.to_json(since=self._sent_step)
        self._sent_step = self.run.step
        try:
            from server import PromptServer

            srv = PromptServer.instance
            if text:
                srv.send_progress_text(text, self.node_id)
            srv.send_sync(PROGRESS_EVENT, event)
        except Exception as e:  # no server in this process, or the page went away: training goes on
            log.debug("%s: progress message failed: %s", self.label, e)

    def watch(self, train: Callable[[], T]) -> T:
        """``train()``, the run marked cancelled or failed on the chart where it raises."""
        try:
            return train()
        except BaseException as e:
            self.fail(e)
            raise

    def finish(self, files) -> None:
        """The run ended and saved ``files``: the page says where."""
        if self.run is None:
            return
        with _lock:
            self.run.status, self.run.files = "done", [str(f) for f in files]
        self._send()

    def fail(self, error: BaseException) -> None:
        """The run stopped (Cancel, out of memory, a NaN, ...); the chart keeps what it drew."""
        if self.run is None:
            return
        cancelled = isinstance(error, comfy.model_management.InterruptProcessingException)
        with _lock:
            self.run.status = "cancelled" if cancelled else "failed"
            self.run.message = "" if cancelled else str(error)[:500]
        self._send()
