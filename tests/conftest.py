"""Test harness: a real ComfyUI host, in-process and as a server. Nothing is mocked.

* ``comfy``: ComfyUI imported in this process on the CPU (``args.cpu`` set before
  ``comfy.model_management`` is imported, ``utils.extra_config`` before ``nodes``).
* ``pack``: this repository imported as a package, as ComfyUI imports a custom node.
* ``tiny_model``: a real ``ModelPatcher`` around a tiny SD1.5-shaped UNet built in memory.
* ``server``: ``main.py --cpu`` on a free port with a temporary base directory and the
  pack linked in ``custom_nodes``; submits API-format graphs to ``/prompt`` and waits on
  ``/history``. A test fails when the log shows ``IMPORT FAILED`` for the pack or a
  traceback from the pack's files it did not ask for.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
PACK_DIR_NAME = "ComfyUI-HyperSD"
PACK_MODULE = "ComfyUI_HyperSD"


def _toy_script():
    """``toy/_script.py``: finds the host's ComfyUI (``HYPERSD_COMFYUI`` or ``.host/ComfyUI``)."""
    name = "hypersd_toy_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "toy" / "_script.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[name] = mod
    return sys.modules[name]


COMFY = _toy_script().comfy_dir()


def _comfy_on_path(cpu: bool = True) -> None:
    try:
        _toy_script().comfy_on_path(cpu)
    except SystemExit as e:
        pytest.exit(f"{e} (scripts/test.sh sets one up)", 2)


def import_comfy(threads: int = 1):
    """Import the real ComfyUI in this process on the CPU; returns the ``comfy`` package.

    Also used by ``bench/`` scripts (they put ``tests/`` on the path to reach it).
    """
    _comfy_on_path()
    import comfy.model_management  # noqa: F401
    import nodes  # noqa: F401
    import torch

    torch.set_num_threads(threads)
    return comfy


@pytest.fixture(scope="session")
def comfy():
    """The real ComfyUI, imported in-process on the CPU. Returns the ``comfy`` package."""
    return import_comfy()


def load_pack():
    """Import this repository as ComfyUI imports a custom node package (idempotent)."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(PACK_MODULE, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = mod
    spec.loader.exec_module(mod)
    mod.on_load()
    return mod


@pytest.fixture(scope="session")
def pack(comfy):
    return load_pack()


@pytest.fixture
def loras(comfy, tmp_path):
    """A fresh first 'loras' folder for the test (ComfyUI's own folder registry)."""
    import folder_paths

    folder = tmp_path / "loras"
    folder.mkdir()
    old = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(folder)] + list(old[0]), old[1])
    try:
        yield folder
    finally:
        folder_paths.folder_names_and_paths["loras"] = old


@pytest.fixture
def training(pack):
    from ComfyUI_HyperSD.nodes import training

    return training


@pytest.fixture(scope="session")
def tiny_model(pack):
    """A real ModelPatcher around a tiny SD1.5-shaped UNet (eps, scaled-linear betas)."""
    from ComfyUI_HyperSD.toy import arch

    return arch.tiny_sd15_patcher(model_channels=32, seed=0)


# ----------------------------------------------------------------------------- server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_pack_file(path: str) -> bool:
    if f"/{PACK_DIR_NAME}/" in path:
        return True
    if not path.startswith("/"):
        return False
    try:
        rel = Path(path).resolve().relative_to(REPO)
    except ValueError:
        return False
    return rel.parts[:1] not in ((".host",), (".venv",))


class PromptError(RuntimeError):
    def __init__(self, status: int, body: dict):
        super().__init__(f"/prompt answered {status}: {json.dumps(body)[:2000]}")
        self.status = status
        self.body = body


class ExecutionFailed(RuntimeError):
    def __init__(self, entry: dict):
        msgs = entry.get("status", {}).get("messages", [])
        err = [m[1] for m in msgs if m[0] == "execution_error"]
        self.error = err[0] if err else {}
        super().__init__(f"execution failed: {self.error.get('exception_type')}: {self.error.get('exception_message')}")


class ComfyServer:
    """A real ComfyUI server process with the pack linked in."""

    def __init__(self, base: Path):
        self.base = base
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        self.proc: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex

    # -- life cycle
    def start(self, timeout: float = 120) -> None:
        for sub in ("custom_nodes", "input", "output", "temp", "user",
                    "models/checkpoints", "models/loras", "models/unet", "models/diffusion_models",
                    "models/vae", "models/clip", "models/text_encoders"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_DIR_NAME
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, str(COMFY / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--database-url", f"sqlite:///{self.base / 'comfy.db'}",
               "--disable-auto-launch", "--disable-metadata"]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=str(COMFY), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited at start (code {self.proc.returncode}):\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.25)
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- log
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def pack_problems(self, text: str) -> list[str]:
        """Lines that show the pack failing: import failures and tracebacks through its files."""
        problems = []
        for line in text.splitlines():
            if "IMPORT FAILED" in line and PACK_DIR_NAME in line:
                problems.append(line)
            if "comfy_entrypoint" in line and PACK_DIR_NAME in line:
                problems.append(line)
        for block in re.split(r"\n(?=Traceback \(most recent call last\))", text):
            if not block.startswith("Traceback"):
                continue
            frames = re.findall(r'^\s+File "([^"]+)"', block, flags=re.M)
            if any(_is_pack_file(f) for f in frames):
                problems.append(block[:3000])
        return problems

    # -- HTTP
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            body = r.read()
            ctype = r.headers.get("Content-Type", "")
        return json.loads(body) if "json" in ctype else body

    def get_status(self, path: str) -> tuple[int, object]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                body = r.read()
                return r.status, (json.loads(body) if body[:1] in (b"{", b"[") else body)
        except urllib.error.HTTPError as e:
            body = e.read()
            return e.code, (json.loads(body) if body[:1] in (b"{", b"[") else body)

    def post_prompt(self, graph: dict) -> str:
        data = json.dumps({"prompt": graph, "client_id": self.client_id}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())["prompt_id"]
        except urllib.error.HTTPError as e:
            raise PromptError(e.code, json.loads(e.read() or b"{}")) from None

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.alive():
                raise RuntimeError(f"the server died:\n{self.log()[-4000:]}")
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") == "error":
                    raise ExecutionFailed(entry)
                return entry
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s:\n{self.log()[-3000:]}")

    def run(self, graph: dict, timeout: float = 300) -> dict:
        return self.wait(self.post_prompt(graph), timeout)

    def free(self) -> None:
        """Drop the execution cache, so an unchanged graph runs again."""
        req = urllib.request.Request(self.url + "/free", data=json.dumps({"free_memory": True}).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=30).read()

    def output_files(self, entry: dict, node_id: str, kind: str = "latents") -> list[Path]:
        out = entry["outputs"][node_id][kind]
        return [self.base / r.get("type", "output") / r.get("subfolder", "") / r["filename"] for r in out]


@pytest.fixture(scope="session")
def comfy_server():
    _comfy_on_path()
    base = Path(tempfile.mkdtemp(prefix="hypersd-server-"))
    srv = ComfyServer(base)
    srv.start()
    problems = srv.pack_problems(srv.log())
    if problems:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail("the pack failed to load in ComfyUI:\n" + "\n".join(problems))
    yield srv
    srv.stop()
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


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (still part of CI)")


# ----------------------------------------------------------------------------- model files

_FILE_CACHE = Path(tempfile.gettempdir()) / "hypersd-test-files"


def cached_file(name: str, build, deps: tuple[str, ...] = ()) -> Path:
    """A generated test file, built once and reused while the sources in ``deps`` are unchanged."""
    import hashlib

    _FILE_CACHE.mkdir(exist_ok=True)
    h = hashlib.sha256(b"".join((REPO / d).read_bytes() for d in deps)).hexdigest()[:12]
    stem, dot, ext = name.partition(".")
    path = _FILE_CACHE / f"{stem}-{h}{dot}{ext}"
    if not path.exists():
        build(path)
    return path


def place(srv: ComfyServer, folder: str, src: Path, name: str | None = None) -> str:
    """Make ``src`` visible in the server's ``models/<folder>`` (symlink); returns its name."""
    dest = srv.base / "models" / folder / (name or src.name)
    if not dest.exists():
        dest.symlink_to(src)
    return dest.name


@pytest.fixture(scope="session")
def sd15_parts(comfy_server, pack):
    """A tiny SD1.5-detected UNet (UNETLoader) and the deterministic CLIP-L (CLIPLoader) on the server."""
    import torch
    from safetensors.torch import save_file

    from ComfyUI_HyperSD.toy import arch, clip

    def build_unet(path):
        model = arch.build_sd15_model(arch.sd15_unet_config(320), seed=0)
        sd = {k: v.to(torch.float16).contiguous() for k, v in model.diffusion_model.state_dict().items()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(sd, str(tmp))
        os.replace(tmp, path)

    unet = cached_file("hypersd_test_sd15_unet.safetensors", build_unet, ("toy/arch.py",))
    clip_file = cached_file("hypersd_test_clip_l.safetensors", clip.write_clip_l, ("toy/clip.py",))
    return {"unet": place(comfy_server, "unet", unet, "hypersd_test_sd15_unet.safetensors"),
            "clip": place(comfy_server, "clip", clip_file, "hypersd_test_clip_l.safetensors")}


@pytest.fixture(scope="session")
def example_parts(comfy_server, sd15_parts, pack):
    """Tiny SD1.5 UNet + CLIP-L (shared), a tiny TAESD VAE, tiny LoRAs named as the official files."""
    import torch

    from ComfyUI_HyperSD.toy import arch, layouts

    def build_vae(path):
        import comfy.taesd.taesd

        torch.manual_seed(0)
        vae = comfy.taesd.taesd.TAESD(latent_channels=4)
        with torch.no_grad():
            for n, p in vae.named_parameters():
                p.copy_(torch.randn(p.shape) * (0.05 if p.dim() > 1 else 0.01))
        layouts.save_file_atomic({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))

    vae = cached_file("hypersd_test_taesd.safetensors", build_vae, ("tests/conftest.py",))
    sd15 = layouts.build_model("SD1.5", arch.sd15_unet_config(320), device="meta")
    sd15_layout = layouts.kohya_layout(sd15)
    sdxl_small = layouts.build_model("SDXL", layouts.sdxl_config(small=True), seed=2)
    sdxl_layout = layouts.kohya_layout(sdxl_small)
    out = {"unet": sd15_parts["unet"], "clip": sd15_parts["clip"],
           "vae": place(comfy_server, "vae", vae, "hypersd_test_taesd.safetensors")}
    loras = comfy_server.base / "models" / "loras"
    for official in ("Hyper-SD15-8steps-lora.safetensors", "Hyper-SD15-1step-lora.safetensors",
                     "Hyper-SD15-8steps-CFG-lora.safetensors"):
        if not (loras / official).exists():
            layouts.write_lora(str(loras / official), sd15_layout, rank=4, alpha=4.0, scale=0.002)
    for official in ("Hyper-SDXL-4steps-lora.safetensors", "Hyper-SDXL-1step-lora.safetensors",
                     "Hyper-SDXL-12steps-CFG-lora.safetensors"):
        if not (loras / official).exists():
            layouts.write_lora(str(loras / official), sdxl_layout, rank=4, alpha=4.0, scale=0.002)
    unet_dir = comfy_server.base / "models" / "diffusion_models"
    if not (unet_dir / "Hyper-SDXL-1step-Unet.safetensors").exists():
        layouts.save_file_atomic(layouts.diffusers_unet_state_dict(sdxl_small),
                                 str(unet_dir / "Hyper-SDXL-1step-Unet.safetensors"))
    return out


def split_checkpoint(api: dict, parts: dict) -> dict:
    """CheckpointLoaderSimple -> UNETLoader + CLIPLoader + VAELoader with the tiny stand-ins."""
    api = json.loads(json.dumps(api))  # a deep copy
    for nid, node in list(api.items()):
        if node["class_type"] != "CheckpointLoaderSimple":
            continue
        api[nid] = {"class_type": "UNETLoader", "inputs": {"unet_name": parts["unet"], "weight_dtype": "default"}}
        api[nid + "_clip"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": parts["clip"],
                                                                      "type": "stable_diffusion"}}
        api[nid + "_vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": parts["vae"]}}
        for other in api.values():
            for k, v in other["inputs"].items():
                if isinstance(v, list) and len(v) == 2 and v[0] == nid and v[1] in (1, 2):
                    other["inputs"][k] = [nid + ("_clip" if v[1] == 1 else "_vae"), 0]
    for node in api.values():
        if node["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage"):
            node["inputs"].update(width=64, height=64)
    return api
