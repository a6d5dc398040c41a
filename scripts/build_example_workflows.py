#!/usr/bin/env python3
"""Write example_workflows/*.json (UI format) from the graphs in hypersd_dev/example_graphs.py.

Run with the host's Python after set-up, from the repository root:
``.venv/bin/python -m scripts.build_example_workflows``. It starts a real ComfyUI server with
the pack to read ``/object_info`` (the widget order of every node), lays each graph out,
and writes the files atomically.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from hypersd_dev import REPO, example_graphs, workflows
from hypersd_dev.server import ComfyServer
from ComfyUI_HyperSD.hypersd_core import files


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="hypersd-wf-"))
    try:
        with ComfyServer(base) as srv:
            info = srv.get("/object_info")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for name, wf in example_graphs.WORKFLOWS.items():
        ui = workflows.api_to_ui(wf["graph"], info, notes=[wf["note"]])
        path = files.write_text(REPO / "example_workflows" / f"{name}.json", json.dumps(ui, indent=1) + "\n")
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
