#!/usr/bin/env python3
"""Write example_workflows/*.json (UI format) from the graphs in hypersd_dev/example_graphs.py.

Run with the host's Python after set-up, from the repository root:
``.venv/bin/python -m scripts.build_example_workflows``. It starts a real ComfyUI server with
the pack to read ``/object_info`` (the widget order of every node), lays each graph out (the
note with its heading on top, columns with room for the wires, groups Load / Hyper-SD /
Sample), gives the nodes that name official files their download address, and writes the
files atomically.
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


def note_with_heading(name: str, note: str) -> str:
    """The note, opening with a heading (the workflow's title) where it has none."""
    if note.startswith("## "):
        return note
    return f"## {example_graphs.TEMPLATES[name][0].split(' · ', 1)[1]}\n\n{note}"


def add_model_sources(ui: dict) -> None:
    """Each node that names an official file gets the front end's ``models`` property (name,
    address, folder): a newer front end offers the download of a missing one."""
    for node in ui["nodes"]:
        found = [v for v in node.get("widgets_values") or [] if isinstance(v, str) and v in example_graphs.MODEL_FILES]
        if found:
            node["properties"]["models"] = [{"name": v, "url": example_graphs.MODEL_FILES[v][1],
                                             "directory": example_graphs.MODEL_FILES[v][0]} for v in found]


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="hypersd-wf-"))
    try:
        with ComfyServer(base) as srv:
            info = srv.get("/object_info")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for name, wf in example_graphs.WORKFLOWS.items():
        ui = workflows.api_to_ui(wf["graph"], info, notes=[note_with_heading(name, wf["note"])])
        add_model_sources(ui)
        path = files.write_text(example_graphs.example_path(name), json.dumps(ui, indent=1) + "\n")
        print(f"wrote {path.relative_to(REPO)}")
    for stale in example_graphs.stale_files(".json"):
        stale.unlink()
        print(f"removed {stale.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
