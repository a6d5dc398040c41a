#!/usr/bin/env python3
"""Write example_workflows/*.json (UI format) from the graphs in tests/example_graphs.py.

Run with the host's Python after set-up: ``.venv/bin/python scripts/build_example_workflows.py``.
It starts a real ComfyUI server with the pack to read ``/object_info`` (the widget order
of every node), lays each graph out, and writes the files atomically.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import example_graphs  # noqa: E402
import workflows  # noqa: E402
from conftest import ComfyServer  # noqa: E402


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="hypersd-wf-"))
    srv = ComfyServer(base)
    try:
        srv.start()
        info = srv.get("/object_info")
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)
    out = REPO / "example_workflows"
    out.mkdir(exist_ok=True)
    for name, wf in example_graphs.WORKFLOWS.items():
        ui = workflows.api_to_ui(wf["graph"], info, notes=[wf["note"]])
        path = out / f"{name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(ui, indent=1) + "\n")
        os.replace(tmp, path)
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
