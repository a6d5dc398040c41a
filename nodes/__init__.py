"""The pack's ComfyUI nodes, one module per feature area.

Each public module exports ``NODES`` (a list of ``io.ComfyNode`` classes) and may export
``register()``, called once when ComfyUI loads the pack (the documented registration
points: sampler and scheduler lists, server routes). Modules are found by name, so a
new feature area is a new file here and nothing else; modules whose names start with
``_`` are the adapters those share (model reading, training inside ComfyUI, progress).
"""
from __future__ import annotations

import importlib
import logging
import pkgutil

from comfy_api.latest import ComfyExtension, io

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


class HyperSDExtension(ComfyExtension):
    async def on_load(self) -> None:
        # Newer ComfyUI calls this; 0.3.75 does not, so comfy_entrypoint calls on_load too.
        on_load()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()
