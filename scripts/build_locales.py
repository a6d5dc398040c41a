#!/usr/bin/env python3
"""Write the pack's English translations and check the others: ``locales/<lang>/*.json``.

    .venv/bin/python -m scripts.build_locales          (from the repository root)

ComfyUI merges ``locales/<lang>/main.json``, ``nodeDefs.json`` and ``settings.json`` of every
pack into ``GET /i18n``; the front end shows a node's name, inputs, outputs and tooltips,
and the settings, in the page's language from there. English (``locales/en``) is made from
the nodes' own schemas and :data:`SETTINGS` / :data:`MESSAGES` (what ``web/hypersd.js``
shows), so it cannot drift from them. Every other language is written by hand and must have
every English key: this script lists what a language lacks (``tests/test_locales.py`` fails
on it), and what it has that English no longer has.
"""
from __future__ import annotations

import json
import sys

import hypersd_dev
from hypersd_dev import REPO

LOCALES = REPO / "locales"
FILES = ("nodeDefs.json", "main.json", "settings.json")

# The page's settings (web/hypersd.js registers them with these ids and English texts).
SETTINGS = {
    "HyperSD.Badges": {
        "name": "Badges and warnings for Hyper-SD files",
        "tooltip": "On LoRA loaders with a Hyper-SD file: a badge with the file's recommended settings and an "
                   "Apply button; on the samplers they feed: a warning when a setting contradicts the file.",
    },
    "HyperSD.ConvertOtherPacks": {
        "name": "Workflows with other Hyper-SD/TCD packs' nodes",
        "tooltip": "When a workflow uses nodes of ComfyUI-TCD, comfyui-tcd-scheduler or the Hyper-SD release "
                   "(TCDModelSamplingDiscrete, TCDScheduler, SamplerTCD, HyperSDXL1StepUnetScheduler) and that pack "
                   "is not installed: ask before converting them to Hyper-SD's nodes, convert without asking, or "
                   "leave them.",
        "options": {"ask": "ask", "convert": "convert", "leave": "leave"},
    },
}
SETTING_CATEGORIES = {"Hyper-SD": "Hyper-SD", "Badges": "Badges", "Show": "Show", "Workflows": "Workflows",
                      "Convert": "Convert"}

# What the page's own controls and messages say (web/hypersd.js: msg("key")).
MESSAGES = {
    "apply": "Apply to sampler",
    "apply_none": "Apply (no sampler connected)",
    "applied": "applied to",
    "warning": "Hyper-SD",
    "like": "Like",
    "dislike": "Dislike",
    "prefer": "Prefer A over B",
    "prefer_tip": "A is the better picture",
    "not_stored": "Hyper-SD rating not stored",
    "convert_title": "Hyper-SD: convert other packs' nodes",
    "convert_ask": "This workflow uses nodes of another Hyper-SD/TCD pack that is not installed: {types}. Convert "
                   "them to Hyper-SD's own nodes? Links and values (steps, eta/gamma, denoise) are kept.",
    "converted": "Hyper-SD: workflow converted",
    "unconverted": "the workflow was opened unconverted",
    "step": "step",
    "loss": "loss",
    "left": "left",
    "done_in": "done in",
    "cancelled": "cancelled",
    "failed": "failed",
    "saved": "saved",
    "stage_file": "stage file",
}


def _key_paths(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _key_paths(v, prefix + (k,))
        else:
            yield prefix + (k,)


def node_defs() -> dict:
    """``{NodeId: {display_name, description, inputs: {name: {name, tooltip}}, outputs: {"0": {name, tooltip}}}}``."""
    hypersd_dev.load_pack(1)
    from ComfyUI_HyperSD.nodes import all_nodes

    out = {}
    for cls in all_nodes():
        info = cls.GET_NODE_INFO_V1()
        inputs = {}
        for section in ("required", "optional"):
            for name, spec in (info["input"].get(section) or {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                entry = {"name": name}
                if opts.get("tooltip"):
                    entry["tooltip"] = opts["tooltip"]
                inputs[name] = entry
        outputs = {}
        for i, (name, tip) in enumerate(zip(info.get("output_name") or [], info.get("output_tooltips") or [])):
            outputs[str(i)] = {"name": name, **({"tooltip": tip} if tip else {})}
        out[info["name"]] = {"display_name": info["display_name"], "description": info.get("description", ""),
                             "inputs": inputs, "outputs": outputs}
    return out


def templates() -> dict:
    """The template browser's titles and descriptions of the example workflows, under the pack's
    folder name in ``custom_nodes`` (the front end's key for a pack's templates)."""
    from hypersd_dev import example_graphs
    from scripts.setup_host import PACK_LINK_NAME

    t = example_graphs.TEMPLATES
    key = {name: i18n_key(stem) for name, stem in example_graphs.FILES.items()}  # by file name, as looked up
    return {"category": {PACK_LINK_NAME: "Hyper-SD"},
            "template": {PACK_LINK_NAME: {key[name]: title for name, (title, _) in t.items()}},
            "templateDescription": {PACK_LINK_NAME: {key[name]: text for name, (_, text) in t.items()}}}


def i18n_key(name: str) -> str:
    """A file name as the front end makes it a message key (its ``normalizeI18nKey``: dots to ``_``)."""
    return name.replace(".", "_")


def english() -> dict[str, dict]:
    """The English files, ``{file name: content}``."""
    settings = {sid.replace(".", "_"): v for sid, v in SETTINGS.items()}
    return {"nodeDefs.json": node_defs(), "settings.json": settings,
            "main.json": {"settingsCategories": SETTING_CATEGORIES, "hypersd": MESSAGES,
                          "templateWorkflows": templates()}}


def text(content: dict) -> str:
    return json.dumps(content, ensure_ascii=False, indent=2, sort_keys=True) + "\n"


def compare(lang: str, en: dict[str, dict]) -> tuple[list[str], list[str]]:
    """``(missing, extra)`` key paths of ``lang`` against English (``file:a.b.c``)."""
    missing, extra = [], []
    for name, content in en.items():
        path = LOCALES / lang / name
        theirs = json.loads(path.read_text()) if path.exists() else {}
        ours = set(_key_paths(content))
        have = {p for p in _key_paths(theirs)}
        empty = {p for p in have if not _get(theirs, p)}
        missing += [f"{name}:{'.'.join(p)}" for p in sorted(ours - (have - empty))]
        extra += [f"{name}:{'.'.join(p)}" for p in sorted(have - ours)]
    return missing, extra


def _get(d, path):
    for k in path:
        d = d[k]
    return d


def main() -> int:
    from ComfyUI_HyperSD.hypersd_core import files

    en = english()
    for name, content in en.items():
        path = LOCALES / "en" / name
        if not path.exists() or path.read_text() != text(content):
            files.write_text(path, text(content))
            print(f"wrote locales/en/{name}")
    bad = 0
    for lang_dir in sorted(p for p in LOCALES.iterdir() if p.is_dir() and p.name != "en"):
        missing, extra = compare(lang_dir.name, en)
        for m in missing:
            print(f"locales/{lang_dir.name}: missing {m}")
        for x in extra:
            print(f"locales/{lang_dir.name}: no longer in English: {x}")
        bad += len(missing)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
