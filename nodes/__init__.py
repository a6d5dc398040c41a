"""The pack's ComfyUI nodes, one module per feature area.

Each module exports ``NODES`` (a list of ``io.ComfyNode`` classes) and may export
``register()``, called once when ComfyUI loads the pack (the documented registration
points: sampler and scheduler lists, server routes). Modules are found by name, so a
new feature area is a new file here and nothing else.
"""
from __future__ import annotations

import importlib
import logging
import pkgutil

_registered = False


def _modules():
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        yield importlib.import_module(f"{__name__}.{info.name}")


def all_nodes() -> list:
    nodes = []
    for mod in _modules():
        nodes.extend(getattr(mod, "NODES", []))
    return nodes


def on_load() -> None:
    """Run each module's ``register()`` once (idempotent)."""
    global _registered
    if _registered:
        return
    for mod in _modules():
        reg = getattr(mod, "register", None)
        if reg is not None:
            reg()
            logging.debug("HyperSD: registered %s", mod.__name__)
    _registered = True
