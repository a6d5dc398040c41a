"""Every HTTP route of the pack probed on a real ComfyUI server (issue 18, item 3, "Routes").

The probes: path traversal in every name a route takes (``..``, absolute paths, encoded dots
and slashes, backslashes, NUL bytes, and names that are symlinks in the model and output
folders to a file outside them holding a secret), huge query strings and bodies (past
ComfyUI's ``client_max_size`` and past the ratings route's own limit), wrong methods,
malformed JSON and JSON of the wrong type or nested 10000 deep. Requests go over a raw
socket, so that each path reaches the server as written here.

Every answer is a 4xx (400, 404, 405, 413, 414, 422) or a plain 200; the pack's own 4xx
answers are ``{"error": sentence}``; the server keeps answering; the secret never comes
back; and no file is written outside the server's folder, nor inside it other than the
ratings database. ComfyUI follows symlinks in its model folders (people rely on that), so a
linked file outside them is read: what is checked is that none of its content comes back.
Also probed: the pack's on-prompt hook (through ``POST /prompt``) and its page's files.
The probes found, and these tests keep fixed: JSON nested past Python's recursion limit, an
unknown charset, infinite or NaN numbers, values of the wrong type deep in a workflow, and ids
or limits past SQLite's integers, each a 500 with a traceback before; and the sentence for a
linked file that is no safetensors file, which quoted its first 8 bytes as the "header length".
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import pytest

from hypersd_dev import PACK_DIR_NAME

ALLOWED = {200, 400, 404, 405, 413, 414, 422}
CLIENT_MAX_SIZE = 100 * 1024 * 1024  # ComfyUI's aiohttp client_max_size: --max-upload-size, 100 (MB) by default
RATING_MAX_BODY = 16 * 1024  # hypersd_core.ratings.MAX_BODY: the ratings route refuses more itself
BIG = 50 * 1024 * 1024
PROBE = "hypersd_probe"  # every file and folder this module makes on the server is named so
HYPERSD_LORA = f"{PROBE}/Hyper-SD15-8steps-lora.safetensors"
WRONG_METHODS = ("PUT", "DELETE", "PATCH")

# Names given to every name-taking input (after the URL's own percent-decoding).
TRAVERSAL = [
    "..", "../..", "../../../../../../etc/passwd", "/etc/passwd", "C:\\x", "C:/Windows/win.ini",
    "..\\..\\..\\etc\\passwd", "\\\\host\\share\\x.safetensors", "./x.safetensors", "a/../../x.safetensors",
    "....//....//etc/passwd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "..%2f..%2fetc%2fpasswd", "%2Fetc%2Fpasswd",
    "x\x00.safetensors", "\x00", "~/.ssh/id_rsa", "file:///etc/passwd", ".", " ", "..;/x", "\u2025/x",
]
# Query strings and path parts sent as written (the server percent-decodes them).
RAW_NAMES = ["..%2f..%2fetc%2fpasswd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "%2Fetc%2Fpasswd", "%2e%2e", "..%5c..%5cx",
             "C:%5Cx", "%252e%252e%252fetc", "x%00y", "%c0%ae%c0%ae%2fx", "..\\..\\x"]
DEEP = 10000


# ----------------------------------------------------------------------------- a raw HTTP client


class Answer:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    @property
    def is_json(self) -> bool:
        return "json" in self.headers.get("content-type", "")

    def json(self):
        return json.loads(self.body)


def _read_answer(sock) -> Answer:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the server closed the connection without an answer ({buf[:200]!r})")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if "content-length" in headers:
        want = int(headers["content-length"])
        while len(body) < want:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            body += chunk
        return Answer(status, headers, body[:want])
    while not (headers.get("transfer-encoding") == "chunked" and body.endswith(b"0\r\n\r\n")):
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            break
        if not chunk:
            break
        body += chunk
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size.split(b";")[0] or b"0", 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return Answer(status, headers, body)


def send(port: int, method: str, target, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 60) -> Answer:
    """``method target`` as written (no normalising, no quoting); the body is sent from a thread
    while the answer is read, so an early answer (413, 400) is read and not lost to a reset."""
    target = target.encode("utf-8", "surrogateescape") if isinstance(target, str) else target
    hdrs = {"Host": f"127.0.0.1:{port}", "Connection": "close", **(headers or {})}
    if body is not None:
        hdrs.setdefault("Content-Type", "application/json")
        if hdrs.get("Transfer-Encoding") != "chunked":
            hdrs["Content-Length"] = str(len(body))
    head = b"\r\n".join([method.encode() + b" " + target + b" HTTP/1.1"]
                        + [f"{k}: {v}".encode("latin-1") for k, v in hdrs.items()]) + b"\r\n\r\n"
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sender = None
    try:
        sock.sendall(head)
        if body:
            def push():
                view = memoryview(body)
                try:
                    for i in range(0, len(view), 1 << 20):
                        sock.sendall(view[i:i + (1 << 20)])
                except OSError:  # the server answered and closed: the answer is what counts
                    pass

            sender = threading.Thread(target=push, daemon=True)
            sender.start()
        return _read_answer(sock)
    finally:
        sock.close()
        if sender is not None:
            sender.join(timeout)


def chunked(data: bytes, size: int = 1 << 20) -> bytes:
    """``data`` in HTTP chunked transfer encoding (a body that does not say its length)."""
    parts = [b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size]) for i in range(0, len(data), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def js(value) -> bytes:
    return json.dumps(value).encode()


def q(name: str) -> str:
    return quote(name, safe="")


def padded(prefix: bytes, total: int) -> bytes:
    """A JSON object of exactly ``total`` bytes: ``prefix`` (``{...,``) and a long string."""
    head = prefix + b'"pad": "'
    return head + b"A" * (total - len(head) - 2) + b'"}'


def nested(depth: int, obj: bool = False) -> bytes:
    return (b'{"a":' * depth + b"1" + b"}" * depth) if obj else (b"[" * depth + b"]" * depth)


MALFORMED = [b"", b"{", b"{not json", b"\xff\xfe\x00\x01", b'{"lora": "x",}', b"\x00", b"NaN", b"Infinity",
             b"[1, 2", b'{"a": "\\ud800"}', b"{'lora': 'x'}", b"null null"]
WRONG_TYPES = [js([]), js([1, 2]), js(5), js(-1.5), js("a string"), js(None), js(True), nested(DEEP),
               nested(DEEP, obj=True), nested(1500), nested(900)]


# ----------------------------------------------------------------------------- the probing


class Prober:
    """Sends probes, checks each answer, counts them by route and status."""

    def __init__(self, srv, markers: list[bytes]):
        self.srv, self.port, self.markers = srv, srv.port, markers
        self.seen: list[tuple[str, int]] = []
        self.problems: list[str] = []

    def __call__(self, route: str, method: str, target, body: bytes | None = None, *, headers=None, pack: bool = True,
                 want=None) -> Answer:
        """Send one probe; what is wrong with its answer is kept in ``problems`` (all are reported at the end).
        ``pack``: a 4xx answer is the pack's (True), the host's (False: the router's, the HTTP parser's, or
        ComfyUI's), or the pack's where it is JSON (None: a path the router may not match)."""
        a = send(self.port, method, target, body, headers)
        self.seen.append((route, a.status))
        where = (f"{method} {str(target)[:160]!r} ({len(body or b'')} bytes: {(body or b'')[:100]!r}) -> {a.status}: "
                 f"{a.body[:300]!r}")
        low = a.body.lower()
        if any(m in low for m in self.markers):
            self.problems.append("the secret came back: " + where)
        if a.status not in ALLOWED | ({403} if want and 403 in want else set()):
            self.problems.append("not a 4xx or 200: " + where)
        elif want is not None and a.status not in want:
            self.problems.append(f"expected {sorted(want)}: " + where)
        the_packs = a.is_json if pack is None else pack and (a.status in (400, 404, 422) or a.is_json)
        if 400 <= a.status < 500 and the_packs:
            err = a.json().get("error") if a.is_json and isinstance(a.json(), dict) else None
            if not (isinstance(err, str) and err.strip() and "Traceback" not in err):
                self.problems.append("the pack's 4xx is no {\"error\": sentence}: " + where)
        return a

    def still_serving(self):
        assert self.srv.alive(), "the server died"
        assert send(self.port, "GET", "/hypersd/train/runs").status == 200
        assert send(self.port, "GET", "/system_stats").status == 200


TALLY: Counter = Counter()


def _tree(root: Path, links: bool = False) -> dict[str, tuple]:
    """Every entry under ``root`` (symlinks not followed): relative path -> (kind, size, mtime)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            kind = "link" if os.path.islink(p) else "dir" if n in dirnames else "file"
            if kind != "dir" or links:
                out[os.path.relpath(p, root)] = (kind, st.st_size, st.st_mtime_ns)
    return out


class Env:
    """The secret outside the server's folders, the links to it, and the pack's own files."""

    def __init__(self, base: Path, outside: Path):
        self.base, self.outside = base, outside
        self.secret = (uuid.uuid4().hex + uuid.uuid4().hex).encode()
        self.content = self.secret + b"\npassword=" + self.secret[::-1] + b"\n"
        self.made: list[Path] = []

    def markers(self) -> list[bytes]:
        """The secret and every 12-character piece of it (a message that quotes part of the file)."""
        s = self.secret
        r = s[::-1]
        return [s] + [s[i:i + 12] for i in range(len(s) - 11)] + [r[i:i + 12] for i in range(0, len(r) - 11, 4)]

    def number_markers(self) -> list[bytes]:
        """The file's first 8 bytes read as a number (how a safetensors header length is read)."""
        head = self.content[:8]
        return [str(int.from_bytes(head, "little")).encode(), str(int.from_bytes(head, "big")).encode(),
                head.hex().encode()]

    def link(self, path: Path, target: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)
        self.made.append(path)

    def setup(self) -> None:
        self.made += [self.base / "output" / PROBE, self.base / "models" / "loras" / PROBE]
        self.outside.mkdir(parents=True)
        (self.outside / "secret.txt").write_bytes(self.content)
        (self.outside / "secret.safetensors").write_bytes(self.content)
        models = self.base / "models"
        for folder in ("loras", "checkpoints", "diffusion_models"):
            self.link(models / folder / f"{PROBE}_secret.safetensors", self.outside / "secret.txt")
        self.link(models / "loras" / f"{PROBE}_secret.ckpt", self.outside / "secret.txt")
        self.link(models / "loras" / f"{PROBE}_secret.pt", self.outside / "secret.txt")
        self.link(models / "loras" / f"{PROBE}_outside", self.outside)  # a folder of the loras list outside
        self.link(models / "loras" / f"{PROBE}_dangling.safetensors", self.outside / "missing.safetensors")
        self.link(self.base / "output" / PROBE / "secret.png", self.outside / "secret.txt")
        self.link(self.base / "output" / PROBE / "outside", self.outside)
        from PIL import Image

        for i, name in enumerate(("a.png", "b.png")):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(self.base / "output" / PROBE / name)
        self._write_lora(models / "loras" / HYPERSD_LORA)

    @staticmethod
    def _write_lora(path: Path) -> None:
        """A tiny kohya-layout SD1.5 LoRA with an official Hyper-SD name (one attention layer)."""
        import numpy as np
        from safetensors.numpy import save_file

        mod = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({f"{mod}.lora_down.weight": np.zeros((4, 768), np.float16),
                   f"{mod}.lora_up.weight": np.zeros((320, 4), np.float16),
                   f"{mod}.alpha": np.array(4.0, np.float16)}, str(path))

    def names(self) -> dict[str, list[str]]:
        """The linked names of each inspect kind."""
        common = [f"{PROBE}_secret.safetensors"]
        return {"lora": common + [f"{PROBE}_secret.ckpt", f"{PROBE}_secret.pt", f"{PROBE}_outside/secret.safetensors",
                                  f"{PROBE}_outside/secret.txt", f"{PROBE}_dangling.safetensors"],
                "unet": common, "checkpoint": common}

    def teardown(self) -> None:
        for p in self.made:  # the folders first (rmtree removes links, never what they point to)
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)


@pytest.fixture(scope="module")
def env(comfy_server, tmp_path_factory, request):
    base = comfy_server.base
    outside = tmp_path_factory.mktemp("hypersd-outside") / "not_a_model_folder"
    e = Env(base, outside)
    before = _tree(base)
    try:
        e.setup()
        outside_before = _tree(outside.parent, links=True)
        yield e
        outside_after = _tree(outside.parent, links=True)
    finally:
        e.teardown()
    problems = []
    # Nothing written outside the server's folder: the secret's folder is as it was.
    if outside_after != outside_before or (outside / "secret.txt").read_bytes() != e.content:
        diff = sorted(set(outside_after.items()) ^ set(outside_before.items()))
        problems.append(f"the folder outside changed: {diff}")
    # Inside it, nothing but the ratings database, ComfyUI's own database and its log.
    after = _tree(base)
    expected = ("server.log", "comfy.db", os.path.join("user", "hypersd", "ratings.sqlite3"))
    changed = sorted(k for k in after if after[k] != before.get(k) and not k.startswith(expected))
    if changed:
        problems.append(f"files written in the server's folder: {changed}")
    routes: dict[str, Counter] = {}
    for (route, status), n in TALLY.items():
        routes.setdefault(route, Counter())[status] += n
    lines = [f"route probes: {sum(TALLY.values())}"] + [
        f"  {route}: {sum(c.values())} ({', '.join(f'{s}: {n}' for s, n in sorted(c.items()))})"
        for route, c in sorted(routes.items())]
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
            reporter.write_line("\n" + "\n".join(lines))
    assert not problems, "\n".join(problems)


@pytest.fixture
def probe(server, env):
    p = Prober(server, env.markers())
    yield p
    TALLY.update(p.seen)
    assert not p.problems, f"{len(p.problems)} of {len(p.seen)} probes answered wrongly:\n" + "\n".join(p.problems)
    p.still_serving()


# ----------------------------------------------------------------------------- GET /hypersd/inspect


def test_inspect(probe, env):
    route = "GET /hypersd/inspect"
    for kind in ("lora", "unet", "checkpoint"):
        for name in TRAVERSAL + [str(env.outside / "secret.txt"), str(env.outside)]:
            probe(route, "GET", f"/hypersd/inspect?{kind}={q(name)}", want={400, 404})
        for raw in RAW_NAMES:
            probe(route, "GET", f"/hypersd/inspect?{kind}={raw}", want={400, 404})
        for name in env.names()[kind]:  # links to a file outside the model folders
            probe(route, "GET", f"/hypersd/inspect?{kind}={q(name)}", want={404, 422})
    probe(route, "GET", "/hypersd/inspect?lora=x\x00y", pack=False)  # a NUL byte in the request line: the host's 400
    for query in ("", "?", "?lora=", "?lora=a&unet=b", "?LORA=x", "?lora=a&lora=b", "?lora[]=x", "?lora=%ZZ"):
        probe(route, "GET", "/hypersd/inspect" + query, want={400, 404})
    a = probe(route, "GET", f"/hypersd/inspect?lora={q(HYPERSD_LORA)}")
    assert a.status == 200 and a.json()["hypersd"] is True, a.body[:300]
    probe(route, "GET", "/hypersd/inspect?lora=" + "a" * 7000, want={400})
    probe(route, "GET", "/hypersd/inspect?lora=" + "a" * 100_000, pack=False, want={400, 414})
    for method in WRONG_METHODS + ("POST",):
        probe(route, method, f"/hypersd/inspect?lora={q(HYPERSD_LORA)}", pack=False, want={405})


def test_inspect_never_echoes_the_bytes_of_a_linked_file(probe, env):
    """The sentence for a file that is no safetensors file says so without quoting its bytes (not
    even its first 8 read as the header's length)."""
    numbers = env.number_markers()
    for kind in ("lora", "unet", "checkpoint"):
        a = probe("GET /hypersd/inspect", "GET", f"/hypersd/inspect?{kind}={q(f'{PROBE}_secret.safetensors')}")
        assert a.status == 422 and "not a valid safetensors file" in a.json()["error"], a.body[:300]
        assert not any(m in a.body for m in numbers), f"the file's first bytes came back: {a.json()['error']}"


# ----------------------------------------------------------------------------- POST /hypersd/check


def _json_post_shapes(probe, route: str, path: str):
    for body in MALFORMED + WRONG_TYPES:
        probe(route, "POST", path, body, want={400})
    for ctype in ("text/plain", "application/json; charset=utf-16", "application/x-www-form-urlencoded",
                  "multipart/form-data; boundary=x"):
        probe(route, "POST", path, js({"lora": "x"}), headers={"Content-Type": ctype})
    # regression: an unknown charset was a LookupError, JSON nested deeper than Python parses a RecursionError (500)
    probe(route, "POST", path, js({"lora": "x"}), headers={"Content-Type": "application/json; charset=no-such"},
          want={400})
    for depth in (300, 600, 990):  # parsed, then deeper than what comes after copies or prints
        probe(route, "POST", path, b'{"nodes": [], "lora": "x", "samplers": [], "x": %s}' % nested(depth),
              want={200, 400, 404})
    probe(route, "POST", path, chunked(js({"lora": "x", "nodes": []})), headers={"Transfer-Encoding": "chunked"})
    probe(route, "POST", path + "?" + "a" * 100_000, js({}), pack=False)
    for method in WRONG_METHODS:
        probe(route, method, path, js({}), pack=False, want={405})
    probe(route, "GET", path, pack=False, want={404, 405})  # GET falls through to ComfyUI's static files: 404


def test_check(probe, env):
    route, path = "POST /hypersd/check", "/hypersd/check"
    _json_post_shapes(probe, route, path)
    for name in TRAVERSAL + [str(env.outside / "secret.txt")]:
        probe(route, "POST", path, js({"lora": name, "samplers": []}), want={400, 404})
    for name in env.names()["lora"]:
        probe(route, "POST", path, js({"lora": name}), want={404, 422})
    for value in (5, None, [], {}, True, ["x"], 1.5, "", {"name": "x"}):
        probe(route, "POST", path, js({"lora": value}), want={400})
    ok = probe(route, "POST", path, js({"lora": HYPERSD_LORA, "strength": 1.0,
                                        "samplers": [{"id": 3, "steps": 8, "cfg": 1.0, "sampler": "ddim"}]}))
    assert ok.status == 200 and ok.json()["hypersd"] is True, ok.body[:300]
    lora = b'{"lora": "%s", ' % HYPERSD_LORA.encode()
    bad_samplers = [js(v) for v in ("x", 5, {"a": 1}, [1], [[1]], ["s"], [None], [{"steps": "a"}], [{"steps": [4]}],
                                    [{"steps": 10 ** 40}], [{"cfg": -1e300}], [{"sampler": ["x"]}],
                                    [{"sampler": "x" * 300}], [{"id": {"a": 1}, "steps": 4}], [{}] * 65,
                                    [{"steps": True}], [{"eta": "NaN"}])]
    bad_samplers += [b"[{\"cfg\": %s, \"eta\": %s}]" % (v, v) for v in (b"1e400", b"NaN", b"-Infinity")]
    bad_samplers += [b'[{"id": %s, "steps": 4}]' % nested(d) for d in (300, 600, 990)]
    for samplers in bad_samplers:
        probe(route, "POST", path, lora + b'"samplers": ' + samplers + b"}")
    for v in (b"1e400", b"-1e400", b"NaN", b"Infinity", b"-Infinity"):  # regression: 1e400 steps were a 500
        probe(route, "POST", path, lora + b'"samplers": [{"steps": %s}]}' % v, want={400})
    for strength in (b'"x"', b"[1]", b"1e400", b"NaN", b"-Infinity", b"1e308", b"{}"):
        probe(route, "POST", path, lora + b'"strength": ' + strength + b"}")
    # Huge bodies: the host's limit (client_max_size) just past it and at it, and 50 MB.
    probe(route, "POST", path, padded(b'{"lora": "x", ', CLIENT_MAX_SIZE + 1), pack=False, want={413})
    probe(route, "POST", path, padded(b'{"lora": "x", ', CLIENT_MAX_SIZE), want={400, 404, 413})
    probe(route, "POST", path, padded(b'{"lora": "x", ', BIG), want={400, 404, 413})
    probe(route, "POST", path, padded(b'{"lora": "x", "samplers": [], ', BIG), want={400, 404, 413})


# ----------------------------------------------------------------------------- POST /hypersd/convert


DAMAGED_WORKFLOWS = [
    {"nodes": "x"}, {"nodes": [], "links": "x"}, {"nodes": [1, "x", None, []]},
    {"nodes": [{"id": 1, "type": "TCDScheduler", "widgets_values": ["x"]}]},
    {"nodes": [{"id": 1, "type": "TCDScheduler", "widgets_values": 5}]},
    {"nodes": [{"id": 1, "type": "SamplerTCD", "widgets_values": [[1]]}]},
    {"nodes": [{"id": 1, "type": "TCDModelSamplingDiscrete", "outputs": [5, "x"]}]},
    {"nodes": [{"id": 1, "type": "TCDModelSamplingDiscrete", "pos": "x"}]},
    {"nodes": [{"id": 1, "type": "TCDModelSamplingDiscrete", "pos": [1]}]},
    {"nodes": [{"id": 1, "type": "TCDModelSamplingDiscrete"}], "last_node_id": "abc"},
    {"nodes": [{"id": 1, "type": "TCDModelSamplingDiscrete"}], "last_node_id": [1]},
    {"nodes": [{"id": 1, "type": "TCDModelSamplingDiscrete"}], "state": {"lastNodeId": "x"}},
    {"nodes": [{"id": 1, "type": "TCDModelSamplingDiscrete", "inputs": [{"name": "model", "link": 5}]}],
     "links": [[5]]},
    {"nodes": [{"id": 1, "type": "TCDModelSamplingDiscrete", "inputs": [{"name": "model", "link": 5}]}],
     "links": [5, "x", None]},
    {"nodes": [{"id": 1, "type": "TCDModelSamplingDiscrete", "inputs": "x", "outputs": [{"links": [7]}]}],
     "links": [[7, 1, 0, 2, 0, "MODEL"]]},
    {"nodes": [{"id": 1, "type": "TCDModelSamplingDiscrete", "inputs": [{"name": "model", "link": 5}],
                "outputs": [{"links": [7]}]}], "links": [[5, 9, "x", 1, 0, "MODEL"], [7, 1, 0, 2, 0, "MODEL"]]},
    {"nodes": [{"id": 1, "type": "TCDScheduler"}], "definitions": {"subgraphs": "x"}},
    {"nodes": [], "definitions": {"subgraphs": [{"nodes": [{"id": 1, "type": "SamplerTCD"}], "links": "x"}]}},
    {"1": {"class_type": "TCDScheduler", "inputs": 5}},
    {"1": {"class_type": "TCDScheduler", "inputs": {"steps": "x"}}},
    {"1": {"class_type": "TCDModelSamplingDiscrete", "inputs": {}}, "2": {"class_type": "X", "inputs": 5}},
    {"1": {"class_type": "TCDModelSamplingDiscrete", "inputs": {}}, "2": {"class_type": "X", "inputs": {"m": [1]}}},
    {"1": {"class_type": ["x"]}}, {"1": {"class_type": {"a": 1}}}, {"1": 5}, {"": {"class_type": "TCDScheduler"}},
]
NUMBERS = [b"1e400", b"-1e400", b"NaN", b"Infinity", b"1e308", b"-5", b"99999999999999999999999"]
NOT_NUMBERS = (b"1e400", b"-1e400", b"NaN", b"Infinity")  # infinite or NaN once parsed: were a 500 here


def test_convert(probe):
    route, path = "POST /hypersd/convert", "/hypersd/convert"
    _json_post_shapes(probe, route, path)
    for wf in DAMAGED_WORKFLOWS:
        probe(route, "POST", path, js(wf), want={200, 400})
    for v in NUMBERS:  # values JSON parsers disagree on, in each converted node's numbers
        want = {400} if v in NOT_NUMBERS else {200, 400}
        probe(route, "POST", path, b'{"nodes": [{"id": 1, "type": "TCDScheduler", "widgets_values": [%s]}]}' % v,
              want=want)
        probe(route, "POST", path, b'{"1": {"class_type": "TCDModelSamplingDiscrete", '
                                   b'"inputs": {"steps": %s, "denoise": 1, "eta": 0.3}}}' % v, want=want)
        probe(route, "POST", path, b'{"nodes": [{"id": 1, "type": "SamplerTCD", "widgets_values": [%s]}]}' % v)
        probe(route, "POST", path, b'{"nodes": [{"id": 1, "type": "TCDModelSamplingDiscrete", '
                                   b'"widgets_values": [%s, "x", %s, %s]}]}' % (v, v, v))
        probe(route, "POST", path, b'{"nodes": [{"id": %s, "type": "TCDModelSamplingDiscrete"}], '
                                   b'"last_node_id": %s}' % (v, v))
    ok = probe(route, "POST", path, js({"nodes": [{"id": 1, "type": "SamplerTCD", "widgets_values": [0.3]}],
                                        "links": []}))
    assert ok.status == 200 and ok.json()["workflow"]["nodes"][0]["type"] == "HyperSDTCDSampler"
    probe(route, "POST", path, padded(b'{"nodes": [], ', CLIENT_MAX_SIZE + 1), pack=False, want={413})
    probe(route, "POST", path, padded(b'{"not_nodes": 1, ', BIG), want={400, 413})


# ----------------------------------------------------------------------------- GET /hypersd/train/runs[/{node}]


def test_train_runs(probe):
    route = "GET /hypersd/train/runs"
    a = probe(route, "GET", "/hypersd/train/runs")
    assert a.status == 200 and isinstance(a.json()["runs"], dict)
    probe(route, "GET", "/hypersd/train/runs?node=..%2f..%2fetc%2fpasswd")
    probe(route, "GET", "/hypersd/train/runs?" + "a" * 100_000, pack=False)
    for method in WRONG_METHODS + ("POST",):
        probe(route, method, "/hypersd/train/runs", pack=False, want={405})
    route = "GET /hypersd/train/runs/{node}"
    for part in [q(n) for n in TRAVERSAL] + RAW_NAMES + ["999", "-1", "%E2%80%AE", "a" * 7000, "__proto__"]:
        probe(route, "GET", "/hypersd/train/runs/" + part, pack=None, want={400, 404})
    probe(route, "GET", "/hypersd/train/runs/x\x00y", pack=False)
    probe(route, "GET", "/hypersd/train/runs/" + "a" * 100_000, pack=False)
    for method in WRONG_METHODS + ("POST",):
        probe(route, method, "/hypersd/train/runs/1", pack=False, want={405})


# ----------------------------------------------------------------------------- the ratings routes


def _image(filename="a.png", subfolder=PROBE, kind="output"):
    return {"filename": filename, "subfolder": subfolder, "type": kind}


def _count(probe) -> int:
    return send(probe.port, "GET", "/hypersd/ratings?limit=0").json()["count"]


def test_ratings_post(probe, env):
    route, path = "POST /hypersd/ratings", "/hypersd/ratings"
    before = _count(probe)
    for body in MALFORMED + WRONG_TYPES + [nested(5000), nested(3000, obj=True)]:  # regression: deep was a 500
        probe(route, "POST", path, body, want={400})
    stored = []
    for depth in (300, 600, 990):  # parsed, then deeper than what comes after prints
        a = probe(route, "POST", path, b'{"kind": "like", "image": %s, "sampler": %s}'
                  % (js(_image()), nested(depth, obj=True)), want={200, 400})
        stored += [a.json()["rating"]["id"]] if a.status == 200 else []
    bad = []
    for name in TRAVERSAL + [str(env.outside / "secret.txt"), "x" * 300, "secret.png", "outside"]:
        bad += [{"kind": "like", "image": _image(name)}, {"kind": "like", "image": _image("a.png", name)},
                {"kind": "like", "image": _image(name, "")}, {"kind": "like", "image": _image("a.png", PROBE, name)},
                {"kind": "prefer", "image": _image(), "other": _image(name)}]
    bad += [{"kind": "like", "image": _image("secret.txt", f"{PROBE}/outside")},  # a linked folder outside
            {"kind": "like", "image": _image("secret.png")},  # a linked file outside
            {"kind": "prefer", "image": _image(), "other": _image("secret.png")},
            {"kind": "like", "image": _image("a.png", "", "temp")}, {"kind": "like", "image": "a.png"},
            {"kind": "like", "image": ["a.png"]}, {"kind": "like", "image": 5}, {"kind": "like", "image": None},
            {"kind": "like", "image": {"filename": 5}}, {"kind": "like", "image": _image([], PROBE)},
            {"kind": "like", "image": _image("a.png", 5)}, {"kind": "like", "image": _image("a.png", PROBE, ["x"])},
            {"kind": "like"}, {"image": _image()}, {"kind": "meh", "image": _image()}, {"kind": ["like"]},
            {"kind": "like", "image": _image(), "pixels": "x"}, {"kind": "prefer", "image": _image()},
            {"kind": "prefer", "image": _image(), "other": _image()},
            {"kind": "like", "image": _image(), "other": _image()},
            {"kind": "like", "image": _image(), "seed": 2 ** 64}, {"kind": "like", "image": _image(), "seed": -1},
            {"kind": "like", "image": _image(), "seed": "5"}, {"kind": "like", "image": _image(), "seed": True},
            {"kind": "like", "image": _image(), "seed": 1.5}, {"kind": "like", "image": _image(), "prompt": "p" * 5000},
            {"kind": "like", "image": _image(), "prompt": "a\x00b"}, {"kind": "like", "image": _image(), "loras": [1]},
            {"kind": "like", "image": _image(), "prompt": 5}, {1: 2}]
    for body in bad:
        probe(route, "POST", path, js(body), want={400})
    for v in (b"1e400", b"NaN", b"-Infinity"):  # numbers JSON parsers disagree on
        probe(route, "POST", path, b'{"kind": "like", "image": %s, "seed": %s}' % (js(_image()), v), want={400})
        a = probe(route, "POST", path, b'{"kind": "like", "image": %s, "sampler": {"cfg": %s}}' % (js(_image()), v))
        stored += [a.json()["rating"]["id"]] if a.status == 200 else []  # kept as the text it was sent as
    # The route's own limit, with and without a declared length; the host's limit is not reached.
    small = b'{"kind": "like", "image": %s, ' % js(_image())
    for size in (RATING_MAX_BODY + 1, BIG, CLIENT_MAX_SIZE + 1):
        a = probe(route, "POST", path, padded(small, size), want={400})
        assert a.is_json and "larger than" in a.json()["error"], size
    a = probe(route, "POST", path, chunked(padded(small, BIG)), headers={"Transfer-Encoding": "chunked"}, want={400})
    assert a.is_json and "larger than" in a.json()["error"]
    probe(route, "POST", path + "?" + "a" * 100_000, js({}), pack=False)
    for method in ("PUT", "PATCH", "DELETE"):
        probe(route, method, path, js({"kind": "like", "image": _image()}), pack=False, want={405})
    # A real rating, then all deleted: the refused probes stored nothing.
    a = probe(route, "POST", path, js({"kind": "prefer", "image": _image("b.png"), "other": _image(), "prompt": PROBE}))
    assert a.status == 200, a.body[:300]
    stored.append(a.json()["rating"]["id"])
    assert _count(probe) == before + len(stored)
    for i in stored:
        assert probe("DELETE /hypersd/ratings/{id}", "DELETE", f"/hypersd/ratings/{i}").json() == {"deleted": i}
    assert _count(probe) == before


def test_ratings_get_and_export(probe):
    route = "GET /hypersd/ratings"
    probe(route, "GET", "/hypersd/ratings?limit=1", want={200})
    probe(route, "GET", "/hypersd/ratings?limit=0&offset=0", want={200})
    for value in ("abc", "-1", "1.5", "1e3", "%00", "..%2f..", "9" * 5000, "0x10",
                  "99999999999999999999", "-99999999999999999999"):  # regression: past SQLite's integers, a 500
        for key in ("limit", "offset"):
            probe(route, "GET", f"/hypersd/ratings?{key}={value}", want={400})
    probe(route, "GET", "/hypersd/ratings?limit=%EF%BC%91", want={200})  # a fullwidth 1: Python's int() reads it
    probe(route, "GET", "/hypersd/ratings?limit=" + "9" * 100_000, pack=False)
    for method in ("PUT", "PATCH", "DELETE"):
        probe(route, method, "/hypersd/ratings", pack=False, want={405})
    route = "GET /hypersd/ratings/export"
    for fmt, kind in (("json", "application/json"), ("csv", "text/csv")):
        a = probe(route, "GET", f"/hypersd/ratings/export?format={fmt}")
        assert a.status == 200 and a.headers["content-type"].startswith(kind)
    bad = ["xml", "JSON", "", "json%00", "csv%0d%0aX-Injected:%201", "..%2f..%2fetc%2fpasswd"]
    for fmt in bad + [q(n) for n in TRAVERSAL]:
        a = probe(route, "GET", f"/hypersd/ratings/export?format={fmt}", want={400})
        assert "x-injected" not in a.headers, fmt
    probe(route, "GET", "/hypersd/ratings/export?format=" + "a" * 100_000, pack=False)
    for method in ("PUT", "PATCH", "POST"):
        probe(route, method, "/hypersd/ratings/export?format=json", pack=False, want={405})
    probe(route, "DELETE", "/hypersd/ratings/export", want={400})  # the delete route's id


def test_ratings_delete(probe):
    route = "DELETE /hypersd/ratings/{id}"
    parts = ["abc", "-1", "0", "1.5", "1e3", "99999999999999999999", "-99999999999999999999", "9" * 5000, "%20",
             "%EF%BC%99%EF%BC%99%EF%BC%99%EF%BC%99%EF%BC%99%EF%BC%99%EF%BC%99%EF%BC%99%EF%BC%99",  # fullwidth digits
             "0x10", "999999999"] + [q(n) for n in TRAVERSAL] + RAW_NAMES
    for part in parts:
        probe(route, "DELETE", "/hypersd/ratings/" + part, pack=None, want={400, 404, 405})
    for part in ("99999999999999999999", "-99999999999999999999"):  # regression: past SQLite's integers, a 500
        probe(route, "DELETE", "/hypersd/ratings/" + part, want={404})
    probe(route, "DELETE", "/hypersd/ratings/1\x00", pack=False)
    probe(route, "DELETE", "/hypersd/ratings/" + "9" * 100_000, pack=False)
    for method in ("PUT", "PATCH", "POST"):
        probe(route, method, "/hypersd/ratings/999999999", pack=False, want={405})
    probe(route, "GET", "/hypersd/ratings/999999999", pack=False, want={404, 405})


# ----------------------------------------------------------------------------- the hook and the page's files


def test_prompt_hook_and_web_files(probe, env):
    """The pack's on-prompt hook reads the checkpoint a queued graph names: links and traversal
    names there change nothing (a graph without outputs is refused by ComfyUI, nothing runs);
    the page's files are served from web/ only."""
    route = "POST /prompt (the pack's hook)"
    for name in [f"{PROBE}_secret.safetensors", "../../../../etc/passwd", str(env.outside / "secret.safetensors"),
                 "..\\..\\x.safetensors", "x\x00.safetensors", 5, None]:
        graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}}
        probe(route, "POST", "/prompt", js({"prompt": graph}), pack=False, want={400})
    # (a "prompt" that is a list, or a node that is a number, is ComfyUI's own 500 after the hook let it pass)
    probe(route, "POST", "/prompt", js({"prompt": {"1": {"class_type": "CheckpointLoader", "inputs": 5}}}), pack=False,
          want={400})
    route = "GET /extensions/<pack>/*"
    web = f"/extensions/{PACK_DIR_NAME}/"
    assert b"hypersd" in probe(route, "GET", web + "hypersd.js", want={200}).body
    for part in ("../__init__.py", "%2e%2e/__init__.py", "%2e%2e%2f__init__.py", "..%5c__init__.py",
                 "docs/..%2f..%2fnodes%2froutes.py", "%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                 "....//nodes/routes.py"):
        a = probe(route, "GET", web + part, pack=False, want={400, 403, 404})
        assert b"comfy_entrypoint" not in a.body and b"def register" not in a.body, part
