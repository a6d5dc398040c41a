"""The real ComfyUI page in Chromium (Playwright), for the browser tests.

Debian's chromium (``/usr/bin/chromium``) and the ``playwright`` Python package; never a
browser download of Playwright's own. The page reaches nothing but the local server.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from scripts.setup_host import CHROMIUM, NEWEST_FRONT_END

from . import REPO

# How long a page test waits for something the page should show (a badge, a toast, a node): the
# suite runs on two workers, so the browser may share the 2 cores with a training run's processes.
UI_WAIT_MS = 30000

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


# The front ends the browser tests run on: the one the built-in host ships (its own package) and
# the newest in the registry (set-up installs it under .host/, served with --front-end-root).
FRONT_ENDS = {"1.32.9": None,
              NEWEST_FRONT_END: REPO / ".host" / f"frontend-{NEWEST_FRONT_END}" / "comfyui_frontend_package" / "static"}


def front_end_root(version: str) -> Path | None:
    """The ``--front-end-root`` of ``version`` (None: the host's own); a missing one fails with
    the line that installs it."""
    root = FRONT_ENDS[version]
    if root is not None and not (root / "index.html").exists():
        raise FileNotFoundError(f"front end {version} is not installed at {root}: bash scripts/test.sh installs it "
                                f"(set-up), or: .venv/bin/pip install --no-deps --target {root.parent.parent} "
                                f"comfyui-frontend-package=={version}")
    return root


def require_browser():
    """Playwright's sync API, or the test fails with the line that installs what is missing
    (set-up installs both where it can: the package always, Debian's chromium as root)."""
    import pytest

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (set-up does it when run as root)",
                    pytrace=False)
    try:
        from playwright import sync_api
    except ImportError:
        pytest.fail("the playwright package is missing: .venv/bin/pip install playwright (set-up installs it)",
                    pytrace=False)
    return sync_api


def server_for(base: Path, front_end: str, env: dict | None = None):
    """A :class:`~hypersd_dev.server.ComfyServer` in ``base`` serving the page of ``front_end``."""
    from .server import ComfyServer

    return ComfyServer(base, env=env, front_end_root=front_end_root(front_end))


def prepare_user(base: Path, settings: dict | None = None) -> None:
    """The server's user settings before it starts: the tutorial done, plus ``settings``."""
    folder = base / "user" / "default"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True, **(settings or {})}))


@contextlib.contextmanager
def open_page(sync_api, srv, viewport=(1280, 900)):
    """``(page, errors)``: the server's page loaded with this pack's extension; ``errors`` collects
    page errors and console errors that mention Hyper-SD."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "hypersd" in m.text.lower()
                    else None)
            page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(srv.url) else r.abort())
            page.goto(srv.url)
            page.wait_for_function("window.app && window.app.graph && window.__hypersd_loaded === true",
                                   timeout=60000)
            yield page, errors
        finally:
            browser.close()


def load_api(page, graph: dict, name: str = "graph.json", scale: float = 0.9) -> None:
    """Open the API-form ``graph`` in the page (``app.loadApiJson``), the view at ``scale``."""
    page.evaluate("""([g, name, scale]) => { window.app.loadApiJson(g, name);
        window.app.canvas.ds.offset = [20, 60]; window.app.canvas.ds.scale = scale;
        window.app.graph.setDirtyCanvas(true, true); }""", [graph, name, scale])
