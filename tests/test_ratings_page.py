"""Rating pictures in the real ComfyUI page: the front end (Chromium through Playwright)
queues EmptyImage -> Hyper-SD Rate Images, the node's rating buttons (``web/hypersd.js``)
appear under its previews, and a like, a dislike and a "prefer A over B" click land in the
ratings database as three rows, and nothing else; a refused one shows the server's sentence.

Needs Debian's chromium (``/usr/bin/chromium``) and the ``playwright`` package; fails with the
install line without them (never ``playwright install``: the page reaches nothing but the local
server)."""
from __future__ import annotations

import json
import sqlite3

import pytest

from hypersd_dev.page import FRONT_ENDS, UI_WAIT_MS, open_page, prepare_user, require_browser, server_for

sync_api = require_browser()  # fails, with the install line, where the browser is missing

GRAPH = {  # the API form; the page makes its nodes (app.loadApiJson)
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 3, "color": 0}},
    "2": {"class_type": "HyperSDRateImages", "inputs": {"images": ["1", 0], "filename_prefix": "page_rated",
                                                        "prompt_text": "rated in the page"}},
}


def _rate_button(kind, index=None):
    return f'[data-hypersd-rate="{kind}"]' + (f'[data-index="{index}"]' if index is not None else "")


def _click_and_wait(page, selector):
    """Click a rating button and wait until its request finished; the outcome ('saved' or 'error')."""
    page.locator(selector).click()
    page.wait_for_function("(sel) => { const b = document.querySelector(sel);"
                           " return b && ['saved', 'error'].includes(b.dataset.state); }", arg=selector, timeout=UI_WAIT_MS)
    return page.locator(selector).get_attribute("data-state")


@pytest.mark.parametrize("front_end", sorted(FRONT_ENDS))
def test_like_dislike_and_prefer_clicks_in_the_page_are_stored(front_end, tmp_path):
    db = tmp_path / "ratings.sqlite3"
    base = tmp_path / "server"
    prepare_user(base)
    with server_for(base, front_end, {"HYPERSD_RATINGS_DB": str(db)}) as srv, open_page(sync_api, srv) as (page, errors):
        page.evaluate("""(g) => {
            window.app.loadApiJson(g, "rate.json");
            window.app.canvas.ds.offset = [40, 80];
            window.app.canvas.ds.scale = 1;
            window.app.graph.setDirtyCanvas(true, true);
            return window.app.queuePrompt(0, 1);
        }""", GRAPH)
        like0 = _rate_button("like", 0)
        page.wait_for_selector(like0, state="visible", timeout=30000)
        history = srv.get("/history")
        assert len(history) == 1, history
        saved = next(iter(history.values()))["outputs"]["2"]["images"]
        assert len(saved) == 3 and all((base / "output" / im["subfolder"] / im["filename"]).is_file()
                                       for im in saved)
        assert page.locator("[data-hypersd-rate]").count() == 3 * 2 + 1  # like + dislike each, one prefer

        outcomes = [_click_and_wait(page, like0), _click_and_wait(page, _rate_button("dislike", 1))]
        page.select_option('select[data-hypersd-select="a"]', "0")
        page.select_option('select[data-hypersd-select="b"]', "2")
        outcomes.append(_click_and_wait(page, _rate_button("prefer")))
        page.screenshot(path=str(tmp_path / "page.png"))
        assert outcomes == ["saved"] * 3, (outcomes, page.locator(".p-toast").all_inner_texts())
        # a refused rating (a picture preferred over itself): the server's sentence in a toast, nothing stored
        page.select_option('select[data-hypersd-select="b"]', "0")
        assert _click_and_wait(page, _rate_button("prefer")) == "error"
        page.get_by_text("compares two different pictures").first.wait_for(timeout=UI_WAIT_MS)  # the toast, either front end

        # a second run (the cached output is sent again) replaces the buttons, it does not add more
        page.evaluate("() => window.app.queuePrompt(0, 1)")
        fresh = "() => document.querySelectorAll('[data-hypersd-rate]:not([data-state])').length >= 7"
        page.wait_for_function(fresh, timeout=30000)
        assert page.locator("[data-hypersd-rate]").count() == 7
        assert page.evaluate("""() => window.app.graph.getNodeById(2).widgets
            .filter((w) => w.name === "hypersd_rating").length""") == 1
        # the widget is no value of the node: neither queued nor saved with the workflow
        sent = page.evaluate("""async () => {
            const p = await window.app.graphToPrompt();
            return {inputs: Object.keys(p.output["2"].inputs).sort(),
                    saved: p.workflow.nodes.find((n) => n.id === 2).widgets_values};
        }""")
        assert sent == {"inputs": ["filename_prefix", "images", "prompt_text"],
                        "saved": ["page_rated", "rated in the page"]}, sent
        assert not errors, errors
        status, listed = srv.request("GET", "/hypersd/ratings")
        assert not srv.pack_problems(srv.log())

    names = [im["filename"] if not im["subfolder"] else f"{im['subfolder']}/{im['filename']}" for im in saved]
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in conn.execute("SELECT * FROM ratings ORDER BY id")]
    assert status == 200 and listed["count"] == 3 and listed["ratings"] == rows
    assert [(r["kind"], r["image"], r["other_image"]) for r in rows] == [
        ("like", names[0], None), ("dislike", names[1], None), ("prefer", names[0], names[2])]
    assert {r["source"] for r in rows} == {"page"} and {r["image_type"] for r in rows} == {"output"}
    assert {r["prompt"] for r in rows} == {"rated in the page"} and {r["seed"] for r in rows} == {None}
    assert [json.loads(r["sampler"]).get("batch_index") for r in rows] == [0, 1, 0]
    assert rows[2]["other_sha256"] and all(r["other_sha256"] is None for r in rows[:2])
