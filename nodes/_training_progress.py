"""Training progress in ComfyUI: the progress bar, the node's text, the console, and Cancel."""
from __future__ import annotations

import logging
import time

import comfy.model_management
import comfy.utils

from ..hypersd_core.train import Callback

log = logging.getLogger(__name__)

PROGRESS_EVENT = "hypersd.train.progress"  # the front end shows it on the node's title bar
LOG_EVERY_S = 10.0  # how often training progress is written to the console log
TEXT_EVERY_S = 0.25  # how often the node's progress text is refreshed


class ComfyProgress(Callback):
    """Moves the node's progress bar, sends step/stage/loss to the page and the log, honours Cancel."""

    def __init__(self, node_id, label: str = "HyperSD TSCD"):
        self.node_id = node_id
        self.label = label
        self.pbar = None
        self._last_text = 0.0
        self._last_log = 0.0

    def on_run_start(self, trainer):
        self.total, self.start, self.t0 = trainer.total_steps, trainer.step, time.monotonic()
        self.pbar = comfy.utils.ProgressBar(max(self.total, 1))
        if self.start:
            self.pbar.update_absolute(self.start, max(self.total, 1))

    def on_step_start(self, trainer):
        comfy.model_management.throw_exception_if_processing_interrupted()

    def on_step_end(self, trainer, loss, logs):
        self.pbar.update_absolute(trainer.step, max(self.total, 1))
        now = time.monotonic()
        if now - self._last_text < TEXT_EVERY_S and trainer.step < self.total:
            return
        self._last_text = now
        rate = (trainer.step - self.start) / max(now - self.t0, 1e-9)
        text = f"step {trainer.step}/{self.total} · {logs.get('stage', '')} · loss {loss:.5f} · {rate:.2f} it/s"
        if now - self._last_log >= LOG_EVERY_S or trainer.step >= self.total:
            self._last_log = now
            log.info("%s: %s", self.label, text)
        self._send(text, {"node": str(self.node_id), "step": trainer.step, "total": self.total, "loss": loss,
                          "stage": logs.get("stage", "")})

    def _send(self, text: str, event: dict) -> None:
        if self.node_id is None:
            return
        try:
            from server import PromptServer

            srv = PromptServer.instance
            srv.send_progress_text(text, self.node_id)
            srv.send_sync(PROGRESS_EVENT, event)
        except Exception as e:  # no server in this process, or the page went away: training goes on
            log.debug("HyperSD TSCD: progress message failed: %s", e)
