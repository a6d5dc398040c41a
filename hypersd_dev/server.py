"""A real ComfyUI server with the pack, and the HTTP client that talks to one.

* :class:`Client`: any running ComfyUI (``/object_info``, ``/prompt``, ``/history``,
  ``/view``, ``/free``, the pack's ``/hypersd/inspect``); the demo uses it on the main
  job's server.
* :class:`ComfyServer`: starts ``main.py`` (``--cpu`` where torch sees no GPU, ``hypersd_dev.device``) on a free port with its own base folder
  and the pack linked into ``custom_nodes``, and reads its log for the pack's failures
  (``IMPORT FAILED``, a failing entry point, tracebacks through the pack's files).
"""
from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from . import PACK_DIR_NAME, REPO, comfy_dir


class PromptError(RuntimeError):
    """``/prompt`` refused the graph (validation failed)."""

    def __init__(self, status: int, body: dict):
        super().__init__(f"/prompt answered {status}: {json.dumps(body)[:2000]}")
        self.status = status
        self.body = body


class ExecutionFailed(RuntimeError):
    """The graph ran and failed; ``error`` holds the server's execution_error message."""

    def __init__(self, entry: dict):
        self.entry = entry  # the prompt's history entry
        msgs = entry.get("status", {}).get("messages", [])
        err = [m[1] for m in msgs if m[0] == "execution_error"]
        self.error = err[0] if err else {}
        super().__init__(f"execution failed: {self.error.get('exception_type')}: {self.error.get('exception_message')}")


def execution_seconds(entry: dict) -> float:
    """Seconds between the server's execution_start and execution_success messages (nan if absent)."""
    ts = {m[0]: m[1].get("timestamp") for m in entry.get("status", {}).get("messages", []) if isinstance(m[1], dict)}
    if ts.get("execution_start") and ts.get("execution_success"):
        return (ts["execution_success"] - ts["execution_start"]) / 1000.0
    return float("nan")


class Client:
    """HTTP client of a running ComfyUI at ``url``."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex

    def get(self, path: str, timeout: float = 60):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            body = r.read()
            ctype = r.headers.get("Content-Type", "")
        return json.loads(body) if "json" in ctype else body

    def get_status(self, path: str) -> tuple[int, object]:
        """(HTTP status, body) without raising on 4xx/5xx."""
        return self.request("GET", path)

    def request(self, method: str, path: str, body=None, data: bytes | None = None) -> tuple[int, object]:
        """(HTTP status, JSON or bytes) of ``method path`` with a JSON ``body`` (or raw ``data``),
        without raising on 4xx/5xx."""
        if body is not None:
            data = json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                out, status = r.read(), r.status
        except urllib.error.HTTPError as e:
            out, status = e.read(), e.code
        return status, (json.loads(out) if out[:1] in (b"{", b"[") else out)

    def rate(self, rating: dict) -> tuple[int, object]:
        """Send one rating to the pack's ``POST /hypersd/ratings``, as the page does."""
        return self.request("POST", "/hypersd/ratings", rating)

    def post_prompt(self, graph: dict) -> str:
        data = json.dumps({"prompt": graph, "client_id": self.client_id}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["prompt_id"]
        except urllib.error.HTTPError as e:
            raise PromptError(e.code, json.loads(e.read() or b"{}")) from None

    def alive(self) -> bool:
        return True

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """The prompt's history entry once it finished; ExecutionFailed if it failed."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.alive():
                raise RuntimeError(f"the server died while prompt {prompt_id} ran")
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") == "error":
                    raise ExecutionFailed(entry)
                return entry
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s")

    def run(self, graph: dict, timeout: float = 300) -> dict:
        return self.wait(self.post_prompt(graph), timeout)

    def free(self) -> None:
        """Drop the execution cache, so an unchanged graph runs again."""
        req = urllib.request.Request(self.url + "/free", data=json.dumps({"free_memory": True}).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=30).read()

    def inspect(self, lora_name: str) -> dict | None:
        """The pack's inspection of a LoRA (``GET /hypersd/inspect``), None when unavailable."""
        status, body = self.get_status("/hypersd/inspect?" + urllib.parse.urlencode({"lora": lora_name}))
        return body if status == 200 and isinstance(body, dict) else None

    def images(self, entry: dict, node_id: str) -> list:
        """The images a SaveImage node of a finished prompt wrote, as PIL images (over ``/view``)."""
        from PIL import Image

        out = []
        for im in entry["outputs"][node_id]["images"]:
            q = urllib.parse.urlencode({"filename": im["filename"], "subfolder": im.get("subfolder", ""),
                                        "type": im.get("type", "output")})
            out.append(Image.open(io.BytesIO(self.get(f"/view?{q}"))).convert("RGB"))
        return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_pack_file(path: str) -> bool:
    """A traceback frame's file that belongs to the pack (not the host or the venv)."""
    if f"/{PACK_DIR_NAME}/" in path:
        return True
    if not path.startswith("/"):
        return False
    try:
        rel = Path(path).resolve().relative_to(REPO)
    except ValueError:
        return False
    return rel.parts[:1] not in ((".host",), (".venv",))


SERVER_FOLDERS = ("custom_nodes", "input", "output", "temp", "user", "models/checkpoints", "models/loras", "models/unet",
                  "models/diffusion_models", "models/vae", "models/clip", "models/text_encoders")


class ComfyServer(Client):
    """A real ComfyUI server process (``main.py``, on the GPU where there is one) with the pack linked in, in ``base``."""

    def __init__(self, base: Path, env: dict | None = None, front_end_root: Path | None = None):
        self.base = Path(base)
        self.extra_env = dict(env or {})  # e.g. HYPERSD_RATINGS_DB for the server process
        self.front_end_root = front_end_root  # another front end's static folder (--front-end-root)
        self.port = _free_port()
        super().__init__(f"http://127.0.0.1:{self.port}")
        self.log_path = self.base / "server.log"
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout: float = 120) -> "ComfyServer":
        for sub in SERVER_FOLDERS:
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_DIR_NAME
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        comfy = comfy_dir()
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1",
                   **self.extra_env)
        from .device import server_args

        cmd = [sys.executable, str(comfy / "main.py"), *server_args(), "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--database-url", f"sqlite:///{self.base / 'comfy.db'}",
               "--disable-auto-launch", "--disable-metadata"]
        if self.front_end_root is not None:
            cmd += ["--front-end-root", str(self.front_end_root)]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=str(comfy), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited at start (code {self.proc.returncode}):\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return self
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
        if self._log:
            self._log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """As :meth:`Client.wait`; a dead server or a timeout also shows the end of the server's log."""
        try:
            return super().wait(prompt_id, timeout)
        except ExecutionFailed:
            raise
        except (RuntimeError, TimeoutError) as e:
            raise type(e)(f"{e}:\n{self.log()[-3000:]}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def pack_problems(self, text: str) -> list[str]:
        """Lines that show the pack failing: import failures, a failing entry point, tracebacks through its files."""
        problems = []
        for line in text.splitlines():
            if PACK_DIR_NAME in line and ("IMPORT FAILED" in line or "comfy_entrypoint" in line):
                problems.append(line)
        for block in re.split(r"\n(?=Traceback \(most recent call last\))", text):
            if not block.startswith("Traceback"):
                continue
            frames = re.findall(r'^\s+File "([^"]+)"', block, flags=re.M)
            if any(is_pack_file(f) for f in frames):
                problems.append(block[:3000])
        return problems

    def output_files(self, entry: dict, node_id: str, kind: str = "latents") -> list[Path]:
        out = entry["outputs"][node_id][kind]
        return [self.base / r.get("type", "output") / r.get("subfolder", "") / r["filename"] for r in out]

    def __enter__(self) -> "ComfyServer":
        self.start()
        problems = self.pack_problems(self.log())
        if problems:
            self.stop()
            raise RuntimeError("the pack failed to load in ComfyUI:\n" + "\n".join(problems))
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
