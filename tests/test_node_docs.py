"""Every node has a help page (``web/docs/<NodeId>.md``), current with its schema, and the
server hands it to the front end's node help panel."""
from __future__ import annotations

import urllib.parse

from hypersd_dev import REPO
from hypersd_dev.server import PACK_DIR_NAME


def test_every_node_has_a_current_help_page(pack):
    from scripts import build_node_docs

    pages = build_node_docs.pages()
    from ComfyUI_HyperSD.nodes import all_nodes

    assert set(pages) == {f"{c.GET_NODE_INFO_V1()['name']}.md" for c in all_nodes()}
    for name, text in pages.items():
        path = REPO / "web" / "docs" / name
        assert path.exists() and path.read_text() == text, (
            f"web/docs/{name} is stale: run .venv/bin/python -m scripts.build_node_docs")
        assert "## Inputs" in text and text.startswith("# ")


def test_the_server_serves_the_help_pages(server):
    for node in ("HyperSDLoraLoader", "HyperSDRateImages", "HyperSDTrainTSCD"):
        path = f"/extensions/{urllib.parse.quote(PACK_DIR_NAME)}/docs/{node}.md"  # what the help panel asks for
        status, body = server.get_status(path)
        assert status == 200 and body.decode().startswith("# "), (path, status)
