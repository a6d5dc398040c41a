#!/usr/bin/env python3
"""Write the help page of every node: ``web/docs/<NodeId>.md``.

    .venv/bin/python -m scripts.build_node_docs          (from the repository root)

ComfyUI's front end shows ``/extensions/<pack>/docs/<NodeId>.md`` in its node help panel (it
asked for it and got a 404 before). Each page is made from the node's own schema, so it says
what the node and its tooltips say and cannot drift from them: the description, a table of the
inputs (type, default, range or choices, the tooltip) and of the outputs, and a pointer to the
README's section on the node's feature area. ``tests/test_node_docs.py`` checks the committed
pages are current.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hypersd_dev
from hypersd_dev import REPO

DOCS = REPO / "web" / "docs"
README_SECTIONS = {  # category -> the README section a reader goes on to
    "Hyper-SD/sampling": "Sampling (`Hyper-SD/sampling`)",
    "Hyper-SD/loaders": "Loaders (`Hyper-SD/loaders`)",
    "Hyper-SD/training": "Training (`Hyper-SD/training`)",
}


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _choices(kind, opts: dict) -> str:
    if isinstance(kind, list):  # a combo: a fixed list of choices, or a folder's files (which vary by install)
        if any(str(o).lower().endswith((".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".sft")) for o in kind):
            return "a file of its model folder"
        return ", ".join(f"`{o}`" for o in kind) if kind else "a file of its model folder"
    parts = []
    if "min" in opts and "max" in opts:
        parts.append(f"{opts['min']:g} to {opts['max']:g}" if isinstance(opts["min"], (int, float)) else "")
    if opts.get("forceInput"):
        parts.append("a socket (connect a node)")
    return ", ".join(p for p in parts if p)


def _type(kind) -> str:
    return "COMBO" if isinstance(kind, list) else str(kind)


def page(info: dict) -> str:
    lines = [f"# {info['display_name']}", "",
             f"`{info['name']}` · category `{info['category']}` · ComfyUI-HyperSD", "",
             info.get("description", "").strip(), ""]
    rows = []
    for section in ("required", "optional"):
        for name, spec in (info["input"].get(section) or {}).items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            default = opts.get("default", "")
            rows.append([f"`{name}`" + ("" if section == "required" else " (optional)"), _type(kind),
                         "" if default == "" or isinstance(kind, list) and not default else f"`{default}`",
                         _choices(kind, opts), opts.get("tooltip", "")])
    if rows:
        lines += ["## Inputs", "", "| input | type | default | range or choices | what it is |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows] + [""]
    outs = list(zip(info.get("output_name") or info.get("output") or [], info.get("output") or [],
                    info.get("output_tooltips") or [""] * len(info.get("output") or [])))
    if outs:
        lines += ["## Outputs", "", "| output | type | what it is |", "|---|---|---|"]
        lines += [f"| `{_cell(n)}` | {_cell(t)} | {_cell(tip or '')} |" for n, t, tip in outs] + [""]
    if info.get("output_node"):
        lines += ["It is an output node: it runs when queued even with nothing connected after it.", ""]
    section = README_SECTIONS.get(info["category"])
    if section:
        lines += [f"More, with the recommended settings of every official file and the measured numbers: the "
                  f"pack's README, section \"{section}\".", ""]
    return "\n".join(lines)


def pages() -> dict[str, str]:
    """``{file name: text}`` of every node's page."""
    hypersd_dev.load_pack(1)
    from ComfyUI_HyperSD.nodes import all_nodes

    out = {}
    for cls in all_nodes():
        info = cls.GET_NODE_INFO_V1()
        out[f"{info['name']}.md"] = page(info)
    return out


def main() -> int:
    from ComfyUI_HyperSD.hypersd_core import files

    for name, text in pages().items():
        path = DOCS / name
        if not path.exists() or path.read_text() != text:
            files.write_text(path, text)
            print(f"wrote web/docs/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
