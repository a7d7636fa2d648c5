"""The review page's flag math (bloodray/review/page.js) agrees with the Python differential, in Node.js.

``tests/test_review_page.py`` checks the same in a real browser, but only
where chromium is installed; this runs the page's differential functions
(everything before its state code, which needs a document) in ``node`` on
the same cases and rules, so a change to the interval math
(:mod:`bloodray.nightly.intervals`) that the port misses fails here too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from bloodray.nightly.contract import FLAGS_UNVERIFIED
from bloodray.nightly.differential import FlagRules, differential_fields, rules_data
from bloodray.nightly.shift import SHIFT_FLAG
from test_review_page import RULES, _cases, _python, _same

NODE = shutil.which("node")
PAGE_JS = Path(__file__).resolve().parents[1] / "bloodray" / "review" / "page.js"
STATE_MARK = "// ------------------------------------------------------------------ state"

pytestmark = pytest.mark.skipif(NODE is None, reason="node not installed")


def _page_differentials(cases: list[dict], rules: FlagRules) -> list[dict]:
    js = PAGE_JS.read_text()
    body = js[js.index("  function clip01"):js.index(STATE_MARK)]
    program = (body + f"\nconst cases = {json.dumps(cases)};\n"
               f"process.stdout.write(JSON.stringify(cases.map((c) => differential(c.counts, "
               f"{json.dumps(rules_data(rules))}, c.wbc, c.shifted, {json.dumps(SHIFT_FLAG)}, c.verified))));")
    out = subprocess.run([NODE, "-e", program], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("label", list(RULES))
def test_page_flag_math_agrees_with_python(label):
    cases = _cases()
    got, want = _page_differentials(cases, RULES[label]), _python(cases, RULES[label])
    fields = [name for name, _ in differential_fields()] + [FLAGS_UNVERIFIED]
    assert len(got) == len(want)
    for i, (js, py) in enumerate(zip(got, want)):
        bad = {f: (js.get(f), py[f]) for f in fields if not _same(js.get(f), py[f])}
        assert not bad, f"{label}, case {i} {cases[i]}: page vs python {bad}"
    assert 0 < sum(bool(py["flags"]) for py in want) < len(want)


def test_page_gives_the_continuity_corrected_bounds():
    # 3 basophils of 100: lower bound 0.78 % (Newcombe), inside the 0.5-1.0 % range; 4 of 100: 1.29 %, basophilia.
    for k, lo in ((3, 0.7779834996), (4, 1.2890866237)):
        counts = {"basophil": k, "neutrophil": 56 - k, "lymphocyte": 36, "monocyte": 5, "eosinophil": 3}
        case = {"counts": counts, "wbc": None, "shifted": False, "verified": {c: 0 for c in counts}}
        row = _page_differentials([case], FlagRules(min_wbc=0))[0]
        assert row["pct_basophil_lo"] == pytest.approx(lo, abs=1e-8)
        assert ("basophilia" in row["flags"]) is (k == 4)
