"""The pack's translations (``locales/<lang>/``): English current with the nodes' schemas and
the page's words, every other language complete, served by the server in ``GET /i18n``, and
the page in Chinese showing the translated node names and the pack's own controls."""
from __future__ import annotations

import json
import re

import pytest

from hypersd_dev import REPO, fixtures
from hypersd_dev.page import FRONT_ENDS, UI_WAIT_MS, open_page, prepare_user, require_browser, server_for

LANGS = sorted(p.name for p in (REPO / "locales").iterdir() if p.is_dir())
JS = (REPO / "web" / "hypersd.js").read_text()


def test_english_is_current_and_every_language_is_complete(pack):
    from scripts import build_locales

    en = build_locales.english()
    for name, content in en.items():
        path = REPO / "locales" / "en" / name
        assert path.exists() and path.read_text() == build_locales.text(content), (
            f"locales/en/{name} is stale: run .venv/bin/python -m scripts.build_locales")
    assert "zh" in LANGS
    for lang in LANGS:
        missing, extra = build_locales.compare(lang, en)
        assert not missing and not extra, (lang, missing[:10], extra[:10])
    zh = json.loads((REPO / "locales" / "zh" / "nodeDefs.json").read_text())
    assert all(re.search(r"[\u4e00-\u9fff]", v["display_name"]) for v in zh.values())  # translated, not copied


def test_the_page_words_and_settings_are_all_in_english():
    from scripts import build_locales

    used = {key for args in re.findall(r"\bmsg\(([^)]*)\)", JS) for key in re.findall(r'"([a-z_]+)"', args)}
    assert used and used <= set(build_locales.MESSAGES), used - set(build_locales.MESSAGES)
    ids = set(re.findall(r'const [A-Z_]+_SETTING = "([^"]+)"', JS))
    assert ids == set(build_locales.SETTINGS)


def test_the_server_serves_them(server):
    i18n = server.get("/i18n")
    for lang in LANGS:
        ours = json.loads((REPO / "locales" / lang / "nodeDefs.json").read_text())
        assert i18n[lang]["nodeDefs"]["HyperSDLoraLoader"] == ours["HyperSDLoraLoader"]
        assert "HyperSD_Badges" in i18n[lang]["settings"] and i18n[lang]["hypersd"]["apply"]


@pytest.mark.parametrize("front_end", sorted(FRONT_ENDS))
def test_the_page_in_chinese(front_end, tmp_path, pack):
    sync_api = require_browser()
    zh_defs = json.loads((REPO / "locales" / "zh" / "nodeDefs.json").read_text())
    zh_main = json.loads((REPO / "locales" / "zh" / "main.json").read_text())
    base = tmp_path / "server"
    prepare_user(base, {"Comfy.Locale": "zh"})
    fixtures.example_parts(base)
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "any.safetensors"}},
        "2": {"class_type": "HyperSDLoraLoader", "inputs": {"model": ["1", 0], "lora_name": "Hyper-SD15-8steps-lora.safetensors",
                                                            "strength": -1.0}},
        "3": {"class_type": "HyperSDTCDSampler", "inputs": {"eta": 0.3}},
    }
    with server_for(base, front_end) as srv, open_page(sync_api, srv) as (page, errors):
        page.evaluate("(g) => window.app.loadApiJson(g, 'zh.json')", graph)
        titles = page.evaluate("() => [2, 3].map((id) => window.app.graph.getNodeById(id).title)")
        assert titles == [zh_defs["HyperSDLoraLoader"]["display_name"], zh_defs["HyperSDTCDSampler"]["display_name"]]
        # the widgets' labels too (1.32.9 takes them from its own store, which drops the pack's)
        labels = page.evaluate("() => Object.fromEntries(window.app.graph.getNodeById(2).widgets"
                               ".filter((w) => ['lora_name', 'strength'].includes(w.name))"
                               ".map((w) => [w.name, w.label || w.name]))")
        inputs = zh_defs["HyperSDLoraLoader"]["inputs"]
        assert labels == {"lora_name": inputs["lora_name"]["name"], "strength": inputs["strength"]["name"]}, labels
        outputs = page.evaluate("() => window.app.graph.getNodeById(2).outputs.map((o) => o.label || o.localized_name"
                                " || o.name)")
        assert outputs == [o["name"] for _, o in sorted(zh_defs["HyperSDLoraLoader"]["outputs"].items(),
                                                         key=lambda kv: int(kv[0]))], outputs
        button = page.wait_for_selector("[data-hypersd-apply]", timeout=UI_WAIT_MS)
        assert button.inner_text() == zh_main["hypersd"]["apply_none"]  # no sampler connected in this graph
        page.screenshot(path=str(tmp_path / "zh.png"))
        assert not errors, errors
