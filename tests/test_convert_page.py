"""Opening, in the real ComfyUI page, a workflow saved with ComfyUI-TCD's and
comfyui-tcd-scheduler's nodes (not installed here): the page asks, converts them to this
pack's nodes on "Confirm" (``web/hypersd.js`` through ``POST /hypersd/convert``), and the
converted graph queues and makes its pictures; on "Cancel" the graph is left as it was.

Needs Debian's chromium and the playwright package (see ``hypersd_dev.page``); fails with
the install line without them."""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest

from hypersd_dev import other_packs
from hypersd_dev.fixtures import place
from hypersd_dev.page import FRONT_ENDS, UI_WAIT_MS, open_page, prepare_user, require_browser, server_for

sync_api = require_browser()  # fails, with the install line, where the browser is missing

OPEN = """(wf) => { window.__hypersd_last_conversion = undefined; window.app.loadGraphData(wf, true, true, "shared.json"); }"""
TYPES = "() => window.app.graph._nodes.map((n) => n.type).sort()"


def _open_and_answer(page, workflow, button):
    page.evaluate(OPEN, workflow)
    dialog = page.locator("[role=dialog]").filter(has_text="convert other packs' nodes")  # both front ends' markup
    dialog.locator("button").filter(has_text=re.compile(rf"^\s*{button}\s*$")).click(timeout=UI_WAIT_MS)


@pytest.mark.parametrize("front_end", sorted(FRONT_ENDS))
def test_a_shared_tcd_workflow_is_converted_on_confirm_and_runs(front_end, tmp_path):
    from toy import install

    base = tmp_path / "server"
    prepare_user(base)
    installed = install.install(Path(tempfile.gettempdir()) / "hypersd-test-files" / "toy-models")
    ckpt = place(base, "checkpoints", installed["checkpoint"])
    with server_for(base, front_end) as srv, open_page(sync_api, srv) as (page, errors):
        info = srv.get("/object_info")
        jetthu = other_packs.as_saved(other_packs.jetthu_graph(ckpt, steps=4, eta=0.4), info)
        dfl = other_packs.as_saved(other_packs.dfl_graph(ckpt, steps=3, gamma=0.6), info)

        # "Cancel": the graph opens as saved, the other packs' nodes missing
        _open_and_answer(page, dfl, "Cancel")
        page.wait_for_function("() => window.app.graph._nodes.some((n) => n.type === 'SamplerTCD')", timeout=UI_WAIT_MS)
        assert page.evaluate("() => window.__hypersd_last_conversion") is None

        # "Confirm": converted in place, values kept, and the graph runs
        page.keyboard.press("Escape")  # the front end's own missing-nodes dialog of the graph before
        _open_and_answer(page, jetthu, "Confirm")
        page.wait_for_function("() => Array.isArray(window.__hypersd_last_conversion)", timeout=UI_WAIT_MS)
        types = page.evaluate(TYPES)
        assert "TCDModelSamplingDiscrete" not in types and {"HyperSDScheduler", "HyperSDTCDSampler"} <= set(types)
        prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
        sampler = next(v for v in prompt.values() if v["class_type"] == "HyperSDTCDSampler")
        sched = next(v for v in prompt.values() if v["class_type"] == "HyperSDScheduler")
        assert sampler["inputs"] == {"eta": 0.4}
        assert {k: sched["inputs"][k] for k in ("steps", "mode", "denoise")} == {"steps": 4, "mode": "tcd", "denoise": 1}
        page.get_by_text("workflow converted").first.wait_for(timeout=UI_WAIT_MS)  # the toast
        page.screenshot(path=str(tmp_path / "converted.png"))
        page.evaluate("() => window.app.queuePrompt(0, 1)")
        for _ in range(300):
            history = srv.get("/history")
            if history:
                break
            page.wait_for_timeout(500)
        entry = next(iter(history.values()))
        assert entry["status"]["status_str"] == "success", entry["status"]
        images = srv.output_files(entry, "9", "images")
        assert len(images) == 2 and all(p.stat().st_size > 100 for p in images)
        assert not errors, errors
        assert not srv.pack_problems(srv.log())
