"""Test fixtures over the development harness (``hypersd_dev``): a real ComfyUI host, in-process
and as a server. Nothing is mocked.

* ``comfy``: ComfyUI imported in this process, on the GPU when torch sees one (``HYPERSD_DEVICE=cpu``
  keeps it on the CPU; ``hypersd_dev.device``), else on the CPU.
* ``pack``: this repository imported as ComfyUI imports a custom node (``ComfyUI_HyperSD``),
  its registration points run.
* ``tiny_model``: a real ``ModelPatcher`` around a tiny SD1.5-shaped UNet built in memory.
* ``server``: ``main.py --cpu`` on a free port with a temporary base folder and the pack
  linked in ``custom_nodes``. A test fails when the log shows the pack failing to load or
  a traceback through the pack's files that the test did not ask for.
* ``loras``: a fresh first ``loras`` folder for one test, removed from ComfyUI after it.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.append(str(_REPO))  # after site-packages; ComfyUI goes first (hypersd_dev.comfy_on_path)

import hypersd_dev  # noqa: E402
from hypersd_dev import device, fixtures  # noqa: E402
from hypersd_dev.server import ComfyServer  # noqa: E402

if not device.wants_cpu():
    # On a GPU the tests run there. CUDA's kernels may add in any order (atomics in the backward
    # pass), and Adam turns gradient differences that small into steps of the learning rate's size:
    # the exact-resume tests ask torch for its deterministic kernels (cuBLAS needs its workspace
    # fixed before CUDA starts). Kernels without a deterministic version only warn.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False

REPO = hypersd_dev.REPO
COMFY = hypersd_dev.comfy_dir()


@pytest.fixture(scope="session")
def comfy():
    """The real ComfyUI, imported in-process (on the GPU where there is one). Returns the ``comfy`` package."""
    try:
        return hypersd_dev.import_comfy(cpu=device.wants_cpu())
    except SystemExit as e:
        pytest.exit(f"{e} (scripts/test.sh sets one up)", 2)


@pytest.fixture(scope="session")
def pack(comfy):
    return hypersd_dev.load_pack(cpu=device.wants_cpu())


@pytest.fixture
def loras(comfy, tmp_path):
    """A fresh first 'loras' folder for the test (ComfyUI's own folder registry), removed after."""
    with fixtures.registered_folder("loras", tmp_path / "loras") as folder:
        folder.mkdir()
        yield folder


@pytest.fixture
def training(pack):
    """The training node's module (its ``train_tscd`` is what the node runs)."""
    from ComfyUI_HyperSD.nodes import training

    return training


@pytest.fixture(scope="session")
def tiny_model(pack):
    """A real ModelPatcher around a tiny SD1.5-shaped UNet (eps, scaled-linear betas)."""
    from toy import arch

    return arch.tiny_sd15_patcher(model_channels=32, seed=0)


# ----------------------------------------------------------------------------- server


@pytest.fixture(scope="session")
def comfy_server():
    base = Path(tempfile.mkdtemp(prefix="hypersd-server-"))
    try:
        with ComfyServer(base) as srv:  # fails here when the pack does not load
            yield srv
    finally:
        shutil.rmtree(base, ignore_errors=True)


class ServerView:
    """The session's server, seen by one test; checks the test's share of the log."""

    def __init__(self, srv: ComfyServer):
        self.srv = srv
        self.expect_pack_errors = False
        self._start = len(srv.log())

    def __getattr__(self, name):
        return getattr(self.srv, name)

    def new_log(self) -> str:
        return self.srv.log()[self._start:]


@pytest.fixture
def server(comfy_server):
    view = ServerView(comfy_server)
    yield view
    assert comfy_server.alive(), "the ComfyUI server died during the test"
    if not view.expect_pack_errors:
        problems = comfy_server.pack_problems(view.new_log())
        assert not problems, "tracebacks from the pack in the server log:\n" + "\n".join(problems)


@pytest.fixture(scope="session")
def sd15_parts(comfy_server, pack):
    """A tiny SD1.5-detected UNet (UNETLoader) and the generated CLIP-L (CLIPLoader) on the server."""
    return fixtures.sd15_parts(comfy_server.base)


@pytest.fixture(scope="session")
def example_parts(comfy_server, pack):
    """Tiny SD1.5 UNet + CLIP-L, a tiny TAESD VAE, tiny LoRAs named as the official files, on the server."""
    return fixtures.example_parts(comfy_server.base)
