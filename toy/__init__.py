"""The embedded toy model family: tiny models in real ComfyUI formats, built here.

Unlike ``hypersd_core``, this package builds ComfyUI objects and therefore needs a
ComfyUI on the import path (the host that ``scripts/setup_host.py`` prepares).
"""
