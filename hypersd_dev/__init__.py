"""The development harness: how tests, ``toy/``, ``bench/`` and ``scripts/`` reach ComfyUI and the pack.

Run everything from the repository root as a module (``python -m toy.demo``,
``python -m bench.bench_tscd``); tests reach this package the same way (``tests/conftest.py``
puts the repository root on ``sys.path``). There is one way to import the pack: as the
package ``ComfyUI_HyperSD`` that this module registers when it is imported (importing the
pack needs no ComfyUI), so its core is ``ComfyUI_HyperSD.hypersd_core``.

* :func:`comfy_dir`, :func:`comfy_on_path`, :func:`import_comfy`: the set-up's ComfyUI
  (``HYPERSD_COMFYUI``, else ``.host/ComfyUI``) imported in this process, on the CPU by
  default (``args.cpu`` is set before ``comfy.model_management`` is imported,
  ``utils.extra_config`` before ``nodes``);
* :func:`load_pack`: ComfyUI in-process and the pack's registration points (sampler and
  scheduler names) run, as when ComfyUI loads the pack;
* ``server``: a real ComfyUI server with the pack linked in, and the HTTP client;
* ``workflows`` and ``example_graphs``: UI/API workflow conversion and the shipped examples;
* ``layouts`` and ``fixtures``: LoRA files of the official layouts and the tiny models and
  model folders the tests and benchmarks run on.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK = "ComfyUI_HyperSD"  # the pack's package name outside ComfyUI
PACK_DIR_NAME = "ComfyUI-HyperSD"  # the folder name in custom_nodes/


def pack_package():
    """The repository imported as the package ``ComfyUI_HyperSD`` (idempotent; needs no ComfyUI)."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = mod
        spec.loader.exec_module(mod)
    return sys.modules[PACK]


def comfy_dir() -> Path:
    return Path(os.environ.get("HYPERSD_COMFYUI") or REPO / ".host" / "ComfyUI")


def comfy_on_path(cpu: bool = True) -> Path:
    """Put the set-up's ComfyUI first on ``sys.path`` (CPU mode by default); returns its folder."""
    d = comfy_dir()
    if not (d / "main.py").exists():
        raise SystemExit(f"no ComfyUI at {d}: run `python3 scripts/setup_host.py` (scripts/test.sh and "
                         f"scripts/run.sh do) or set HYPERSD_COMFYUI")
    if str(d) in sys.path:
        sys.path.remove(str(d))
    sys.path.insert(0, str(d))  # before the repository root, whose nodes/ would shadow ComfyUI's nodes.py
    import comfy.cli_args

    if cpu:
        comfy.cli_args.args.cpu = True
    import utils.extra_config  # noqa: F401  (before anything imports `nodes`)
    return d


def import_comfy(threads: int = 1, cpu: bool = True):
    """The real ComfyUI, imported in this process; returns the ``comfy`` package."""
    comfy_on_path(cpu)
    import comfy.model_management  # noqa: F401
    import nodes  # noqa: F401
    import torch

    torch.set_num_threads(threads)
    import comfy

    return comfy


def load_pack(threads: int = 1, cpu: bool = True):
    """ComfyUI in-process and the pack loaded as ComfyUI loads it (its ``register()`` points run)."""
    import_comfy(threads, cpu)
    mod = pack_package()
    importlib.import_module(PACK + ".nodes").on_load()
    return mod



def table(headers: list[str], rows: list[list]) -> str:
    """A plain-text table (benchmarks print their results with it)."""
    cells = [[str(h) for h in headers]] + [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


pack_package()
