"""Every example workflow has its thumbnail (``example_workflows/<name>.jpg``, which ComfyUI's
template browser shows beside ``<name>.json``): a real picture, and none without its workflow.
It checks the committed files; ``scripts/build_thumbnails.py`` renders them."""
from __future__ import annotations

import numpy as np
from PIL import Image

from hypersd_dev import REPO

EXAMPLES = REPO / "example_workflows"


def test_every_workflow_has_a_thumbnail():
    workflows = {p.stem for p in EXAMPLES.glob("*.json")}
    thumbs = {p.stem for p in EXAMPLES.glob("*.jpg")}
    assert workflows, "no example workflows"
    missing = sorted(workflows - thumbs)
    assert not missing, (f"no thumbnail for {missing}: run "
                         f"OMP_NUM_THREADS=1 .venv/bin/python -m scripts.build_thumbnails")
    assert not thumbs - workflows, f"thumbnails without a workflow: {sorted(thumbs - workflows)}"
    for name in sorted(workflows):
        path = EXAMPLES / f"{name}.jpg"
        with Image.open(path) as im:
            assert im.format == "JPEG", f"{path.name} is {im.format}, not a JPEG"
            assert im.width >= 300 and im.height >= 200, f"{path.name} is only {im.width}x{im.height}"
            pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
        assert pixels.std() > 5, f"{path.name} is a flat colour (std {pixels.std():.1f})"
