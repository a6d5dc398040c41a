#!/usr/bin/env python3
"""Open every example workflow in the real ComfyUI front end and compare its API form.

A manual check (not part of CI: it needs Debian's chromium and the playwright package,
``apt-get install chromium`` and ``.venv/bin/pip install playwright``). It starts a real
server with the pack, loads each ``example_workflows/*.json`` with ``app.loadGraphData``,
asks the front end for the prompt it would queue (``app.graphToPrompt``) and checks that
it equals what ``hypersd_dev.workflows`` makes of the file, which is what CI runs. Then it
gives Load Checkpoint a LoRA file and checks that the pack's advice reaches the page (toast).

    .venv/bin/python -m scripts.check_workflows_in_browser      (from the repository root)
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from hypersd_dev import REPO, workflows
from hypersd_dev.server import ComfyServer

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def main() -> int:
    from playwright.sync_api import sync_playwright

    base = Path(tempfile.mkdtemp(prefix="hypersd-ui-"))
    (base / "user" / "default").mkdir(parents=True)
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    srv = ComfyServer(base)
    failures = 0
    try:
        srv.start()
        info = srv.get("/object_info")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
            page = browser.new_page()
            page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(srv.url) else r.abort())
            page.goto(srv.url)
            page.wait_for_function("window.app && window.app.graph && window.__hypersd_loaded === true", timeout=60000)
            for path in sorted((REPO / "example_workflows").glob("*.json")):
                ui = json.loads(path.read_text())
                got = page.evaluate("""async (wf) => {
                    await window.app.loadGraphData(wf);
                    const p = await window.app.graphToPrompt();
                    return {n: window.app.graph._nodes.length, output: p.output};
                }""", ui)
                ours = {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
                        for k, v in workflows.ui_to_api(ui, info).items()}
                known = lambda c: {n for sec in info[c]["input"].values() for n in sec}  # noqa: E731
                # the front end also sends values of its own display-only widgets; the server ignores them
                theirs = {k: {"class_type": v["class_type"],
                              "inputs": {n: x for n, x in v["inputs"].items() if n in known(v["class_type"])}}
                          for k, v in got["output"].items()}
                ok = ours == theirs and got["n"] == len(ui["nodes"])
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {path.name}: {got['n']} nodes in the editor")
                if not ok:
                    print("  front end:", json.dumps(theirs, sort_keys=True)[:1500])
                    print("  ours:     ", json.dumps(ours, sort_keys=True)[:1500])
            # advice: a LoRA given to Load Checkpoint -> a toast naming the right node
            shutil.copy(REPO / "toy" / "weights" / "hypersd_toy_tscd_lora.safetensors",
                        base / "models" / "checkpoints" / "not_a_checkpoint.safetensors")
            try:
                srv.post_prompt({"1": {"class_type": "CheckpointLoaderSimple",
                                       "inputs": {"ckpt_name": "not_a_checkpoint.safetensors"}}})
            except Exception:
                pass  # the prompt itself may be refused (no output node); the advice comes first
            advice = page.wait_for_function("window.__hypersd_last_advice", timeout=20000).json_value()
            ok = advice.get("use_node") == "HyperSDLoraLoader"
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} advice toast: {advice.get('message', '')[:100]}")
            page.wait_for_timeout(500)
            page.screenshot(path=str(base / "last.png"))
            shutil.copy(base / "last.png", Path(tempfile.gettempdir()) / "hypersd-ui-last.png")
            browser.close()
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
