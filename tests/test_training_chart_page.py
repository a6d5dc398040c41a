"""Training you can watch, in the real ComfyUI page: a short Hyper-SD Train TSCD LoRA run
queued from the page draws its chart inside the node with a point for every step, a line
for each stage, and where the LoRA files were saved; after a page reload the chart comes
back from the server (``GET /hypersd/train/runs/{node}``).

Needs Debian's chromium and the playwright package (see ``hypersd_dev.page``); fails with
the install line without them."""
from __future__ import annotations


import pytest

from hypersd_dev import fixtures
from hypersd_dev.page import FRONT_ENDS, load_api, open_page, prepare_user, require_browser, server_for

sync_api = require_browser()  # fails, with the install line, where the browser is missing

CHART = "[data-hypersd-chart]"


@pytest.mark.parametrize("front_end", sorted(FRONT_ENDS))
def test_a_training_run_draws_its_chart_and_it_survives_a_reload(front_end, tmp_path, pack):
    base = tmp_path / "server"
    prepare_user(base)
    parts = fixtures.sd15_parts(base)
    graph = fixtures.tscd_train_graph(parts, "page_chart", steps_per_stage=3, resume=False)
    with server_for(base, front_end) as srv, open_page(sync_api, srv, viewport=(1600, 1000)) as (page, errors):
        load_api(page, graph)
        page.evaluate("() => window.app.queuePrompt(0, 1)")
        page.wait_for_selector(f'{CHART}[data-hypersd-status="done"]', timeout=300000)
        chart = page.locator(CHART)
        assert chart.get_attribute("data-hypersd-chart") == "6"  # stages 2,1 x 3 steps: a point a step
        assert chart.get_attribute("data-hypersd-stages") == "2"
        lora = base / "models" / "loras" / "page_chart.safetensors"
        files = chart.get_attribute("data-hypersd-files").split("|")
        assert files[0] == str(lora) and lora.exists()
        text = chart.inner_text()
        assert "step 6/6" in text and "done in" in text and f"saved: {lora}" in text
        page.screenshot(path=str(tmp_path / "chart.png"))
        # the old title-bar line is gone: the chart is the node's only progress of its own
        assert page.evaluate("() => window.app.graph.getNodeById(6).hypersdStatus") is None

        page.reload()
        page.wait_for_function("window.app && window.app.graph && window.__hypersd_loaded === true", timeout=60000)
        load_api(page, graph)  # the same workflow opened again (node 6)
        page.wait_for_selector(f'{CHART}[data-hypersd-chart="6"][data-hypersd-status="done"]', timeout=30000)
        page.screenshot(path=str(tmp_path / "chart_after_reload.png"))
        assert not errors, errors
        assert not srv.pack_problems(srv.log())
