"""ComfyUI-HyperSD: Hyper-SD few-step sampling, LoRA loading and distillation for ComfyUI.

The ComfyUI entry point (V3 node API): ``comfy_entrypoint`` and ``WEB_DIRECTORY``. The
nodes live in ``nodes/`` (one file per feature area, each exporting ``NODES``) and are
imported when ComfyUI calls the entry point, so importing this package needs no ComfyUI:
``hypersd_core/`` (the method in plain torch) can be used on its own as
``<package>.hypersd_core``, from scripts and tests alike.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    try:
        from .nodes import HyperSDExtension, on_load

        on_load()  # idempotent: sampler/scheduler names and server routes (0.3.75 never calls on_load)
    except Exception:  # ComfyUI logs only the message; the traceback says where
        import logging

        logging.getLogger(__name__).exception("ComfyUI-HyperSD failed to load")
        raise
    return HyperSDExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
