"""ComfyUI-HyperSD: Hyper-SD few-step sampling, LoRA loading and distillation for ComfyUI.

ComfyUI entry point (V3 node API). The nodes live in ``nodes/`` (one file per feature
area, each exporting ``NODES``); the method itself lives in ``hypersd_core/`` and
imports nothing from ComfyUI.
"""
from comfy_api.latest import ComfyExtension, io

from .nodes import all_nodes, on_load

WEB_DIRECTORY = "./web"


class HyperSDExtension(ComfyExtension):
    async def on_load(self) -> None:
        # Newer ComfyUI calls this; 0.3.75 does not, so comfy_entrypoint calls it too.
        on_load()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()


async def comfy_entrypoint() -> HyperSDExtension:
    on_load()  # idempotent: sampler/scheduler names and server routes
    return HyperSDExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
