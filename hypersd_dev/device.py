"""Where a ComfyUI server this repository starts runs its models: on the GPU when torch sees one.

``python -m hypersd_dev.device`` prints the device arguments for ComfyUI's ``main.py`` (what
``scripts/run.sh`` and :class:`hypersd_dev.server.ComfyServer` pass): ``--cpu`` when torch sees
no accelerator (CUDA, ROCm through CUDA, Apple MPS, Intel XPU) or ``HYPERSD_DEVICE=cpu`` asks for
it, nothing otherwise, so that a user with a GPU gets a GPU server. The tests' in-process ComfyUI
follows the same choice (:func:`wants_cpu`), so the suite runs on CUDA where there is one. CI
machines have no GPU.
"""
from __future__ import annotations

import os


def has_accelerator() -> bool:
    import torch

    for name in ("cuda", "mps", "xpu"):
        backend = getattr(torch, name, None) if name != "mps" else getattr(torch.backends, "mps", None)
        try:
            if backend is not None and backend.is_available():
                return True
        except Exception:  # a broken driver is no accelerator
            continue
    return False


def server_args() -> list[str]:
    """``["--cpu"]`` or ``[]`` (``HYPERSD_DEVICE``: ``cpu`` forces the CPU, ``auto``, the default, asks torch)."""
    choice = os.environ.get("HYPERSD_DEVICE", "auto").strip().lower()
    if choice not in ("auto", "cpu", "gpu"):
        raise SystemExit(f"HYPERSD_DEVICE={choice!r}: use auto, cpu or gpu")
    if choice == "cpu" or (choice == "auto" and not has_accelerator()):
        return ["--cpu"]
    return []


def wants_cpu() -> bool:
    """Whether ComfyUI imported in this process (the tests' ``comfy`` fixture) runs on the CPU:
    the same choice as the server's (``HYPERSD_DEVICE``, else whether torch sees an accelerator)."""
    return server_args() == ["--cpu"]


if __name__ == "__main__":
    print(" ".join(server_args()))
