"""The real ComfyUI page in Chromium (Playwright), for the browser tests.

Debian's chromium (``/usr/bin/chromium``) and the ``playwright`` Python package; never a
browser download of Playwright's own. The page reaches nothing but the local server.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


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
