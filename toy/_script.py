"""Helpers for running toy/ modules as scripts with the host's Python (not used by the pack).

``comfy_on_path()`` puts the host's ComfyUI (``HYPERSD_COMFYUI`` or ``.host/ComfyUI``)
on ``sys.path`` in CPU mode; ``toy_package()`` imports this folder as the package
``hypersd_toy`` so its relative imports work (the repository root is never put on
``sys.path``: the pack's ``nodes/`` would shadow ComfyUI's ``nodes`` module).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

TOY = Path(__file__).resolve().parent
REPO = TOY.parent


def comfy_dir() -> Path:
    return Path(os.environ.get("HYPERSD_COMFYUI") or REPO / ".host" / "ComfyUI")


def comfy_on_path(cpu: bool = True) -> Path:
    d = comfy_dir()
    if not (d / "main.py").exists():
        raise SystemExit(f"no ComfyUI at {d}: run scripts/setup_host.py first or set HYPERSD_COMFYUI")
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))
    import comfy.cli_args

    if cpu:
        comfy.cli_args.args.cpu = True
    import utils.extra_config  # noqa: F401  (before anything imports `nodes`)
    return d


def toy_package():
    for name in ("ComfyUI_HyperSD.toy", "hypersd_toy"):
        if name in sys.modules:
            return sys.modules[name]
    spec = importlib.util.spec_from_file_location("hypersd_toy", TOY / "__init__.py",
                                                  submodule_search_locations=[str(TOY)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["hypersd_toy"] = mod
    spec.loader.exec_module(mod)
    return mod
