"""The benchmarks' results as files: one JSON per benchmark, with the machine it ran on.

Each benchmark given ``--json PATH`` writes, atomically::

    {"benchmark": name, "date": ISO time, "quick": bool, "machine": {...}, "settings": {...},
     "figures": {...}}

``machine`` is what a reader needs to compare runs: the CPU model and core count, the
accelerator torch sees, torch, Python and ComfyUI versions. ``bash scripts/bench.sh`` puts
the files in ``bench/results/`` (``bench/results/quick/`` for ``--quick``) and renders them
into a page with plots (``bench/render.py``).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

from hypersd_dev import REPO

RESULTS = REPO / "bench" / "results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _comfyui_version() -> str:
    try:
        from hypersd_dev import comfy_dir

        text = (comfy_dir() / "comfyui_version.py").read_text()
        return text.split("=", 1)[1].strip().strip("\"'")
    except Exception:  # no host set up: the file still says where it ran
        return "unknown"


def machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version(), "comfyui": _comfyui_version(), "system": platform.platform()}


def _no_paths(value):
    """``value`` with this machine's paths out: the repository's become relative, others a mark
    (result files are committed, and no path of the machine goes into a commit)."""
    if isinstance(value, dict):
        return {k: _no_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_paths(v) for v in value]
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str) and os.path.isabs(value):
        return os.path.relpath(value, REPO) if value.startswith(str(REPO) + os.sep) else "<a local path>"
    return value


def save(path, benchmark: str, figures: dict, settings: dict, quick: bool = False) -> Path:
    """Write one benchmark's result file (atomically, without this machine's paths); returns its path."""
    from ComfyUI_HyperSD.hypersd_core import files

    doc = {"benchmark": benchmark, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "quick": bool(quick), "machine": machine(), "settings": _no_paths(settings), "figures": _no_paths(figures)}
    return files.write_text(Path(path), json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n")


def load_all(folder) -> dict[str, dict]:
    """``{benchmark: document}`` of the result files in ``folder``."""
    out = {}
    for p in sorted(Path(folder).glob("*.json")):
        try:
            doc = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(doc, dict) and "benchmark" in doc and "figures" in doc:
            out[doc["benchmark"]] = doc
    return out
