"""The nightly report in a real headless browser (Debian's ``chromium``) at phone and desktop widths.

Through the DevTools protocol (:mod:`helpers_browser`): after load, every
``<img>`` must have decoded (``naturalWidth > 0``) and the page must be no
wider than the viewport (390 px phone, 1,440 px desktop).
"""

from __future__ import annotations

import pytest

from bloodray import storage
from bloodray.analysis.report import write_report
from bloodray.config import load_config
from bloodray.data import synth
from bloodray.nightly.config import ClassifyConfig
from bloodray.nightly.pipeline import run_classification
from helpers_browser import CHROMIUM, DESKTOP, PHONE, check_page, screenshot

DATE = "2024-07-01"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium; "
                                                         ".ci/run installs it)")


@pytest.mark.slow
def test_report_loads_every_image_and_fits_a_phone(tmp_path, ray_cluster):
    archive, out = tmp_path / "archive", str(tmp_path / "out")
    synth.write_archive(storage.join(str(archive), DATE), synth.default_samples(3, 10, seed=7), size=64, seed=7)
    cfg = load_config(ClassifyConfig, None, [f"input.uri={archive}", f"output.uri={out}", f"run.date={DATE}",
                                             "inference.batch_size=8", "review.threshold=0.9"])
    run_classification(cfg)
    report = tmp_path / "report"
    write_report(out, DATE, dest=str(report))
    text = (report / "report.html").read_text()
    assert "<script" not in text and [p.name for p in report.iterdir()] == ["report.html"]

    for viewport in (PHONE, DESKTOP):
        result = check_page(report / "report.html", viewport)
        # 30 cell thumbnails (3 samples x 10 cells) and at least the differential figure.
        assert result["n_images"] >= 31 and result["broken"] == [], (viewport, result)
        # A mobile viewport widens to fit content that overflows, so compare with the emulated width itself.
        assert result["scroll_width"] <= viewport[0] and result["inner_width"] == viewport[0], (viewport, result)
    assert screenshot(report / "report.html", PHONE)[:8] == b"\x89PNG\r\n\x1a\n"
