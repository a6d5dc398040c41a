"""The soak, shortened (issue 18, item 1; ``python -m bench.soak`` runs 200 prompts): one fresh
server, every kind of prompt of the pack once (the warm-up) and then a seeded mix, valid and
invalid ones interleaved, with the page's routes asked between them."""
from __future__ import annotations

import tempfile
from pathlib import Path

from bench import soak
from hypersd_dev.server import ComfyServer


def test_a_shortened_soak_holds(pack, tmp_path):
    with ComfyServer(Path(tempfile.mkdtemp(dir=tmp_path))) as srv:
        report = soak.soak(srv, prompts=soak.QUICK_PROMPTS, seed=1)
        assert srv.alive()
    s = report.summary()
    print(soak.table(report))
    assert s["prompts"] == soak.QUICK_PROMPTS and s["valid"] > 20 and s["invalid"] > 8, s
    assert s["valid_ok"] == s["valid"], s["failures"]  # every valid prompt succeeded
    assert s["invalid_refused_cleanly"] == s["invalid"], s["failures"]  # refused with a sentence, never a crash
    assert set(s["invalid_by_class"]) == {"validation", "pack error"}, s["invalid_by_class"]
    assert s["alive_throughout"] and s["route_failures"] == 0 and s["ratings_stored"] > 0, report.route_failures
    assert s["rss_growth"] <= soak.MEMORY_GROWTH_LIMIT, s
