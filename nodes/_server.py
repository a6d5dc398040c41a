"""The ComfyUI server the pack's routes join (shared by ``routes`` and ``ratings``)."""
from __future__ import annotations


def prompt_server():
    """``(aiohttp.web, PromptServer.instance)``, or None where no server runs in this process
    (tests and scripts that import the pack in-process)."""
    try:
        from aiohttp import web
        from server import PromptServer

        inst = PromptServer.instance
    except Exception:  # no server module or no instance yet
        return None
    return None if inst is None else (web, inst)
