"""How often the differential's flags fire when every cell is classified right.

Run from the repository root (pure numpy, a few seconds)::

    .venv/bin/python bench/flags.py                 # 20,000 simulated samples per row
    .venv/bin/python bench/flags.py --trials 2000   # quicker

Writes ``bench/results/flags.json`` and ``bench/results/flags.md``.

A perfect classifier is simulated: a sample of ``n`` white cells is a
multinomial draw from its true differential (erythroblasts, which are not
white cells, come as a negative-binomial count: the erythroblasts met before
the ``n``-th white cell). Each simulated sample is flagged by

* the OLD rules (the code before issue 11, kept below as :func:`old_flags`):
  a percentage strictly outside its range, low limits for all five classes,
  any erythroblast, ig above 0.9 %;
* the NEW rules: :func:`bloodray.nightly.differential.compute_differentials`
  with the packaged defaults (95 % Wilson intervals, flags only when the whole
  interval is outside, no low limit for monocytes/eosinophils/basophils,
  erythroblasts above 1 and ig above 0.9 per 100 WBC).

Profiles (% of white cells):

* ``healthy``: the middle of every range -- neutrophils 50, lymphocytes 30,
  monocytes 5, eosinophils 2.5, basophils 0.75 -- which leaves 11.75 %; it goes
  to neutrophils and lymphocytes, half each (their ranges are equally wide,
  20 points), so every class stays inside its range: neutrophils 55.875,
  lymphocytes 35.875; no ig, no erythroblasts (healthy adult blood);
* ``healthy (five renormalised)``: the five midpoints scaled to sum to 100
  (neutrophils 56.7, lymphocytes 34.0, monocytes 5.67, eosinophils 2.83,
  basophils 0.85), a second reading of "the middle of the ranges";
* ``healthy, 0.3 % ig``: ``healthy`` with 0.3 % immature granulocytes taken
  from the neutrophils (within what healthy adults show);
* abnormal: one class set to neutrophils 80, lymphocytes 55, eosinophils 12 or
  monocytes 15 %, the other classes of ``healthy`` scaled to fill the rest;
  "flagged" = that profile's own flag (e.g. neutrophilia) was raised; plus ig
  3 % and erythroblasts 3 per 100 WBC, for the per-100-WBC thresholds.

Targets (issue 11): healthy flagged in <= 5 % at 100 and 200 cells; each
abnormal profile flagged in >= 90 % at 200 cells.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_facts, save, table  # noqa: E402

from bloodray.classes import CLASS_NAMES, WBC_CLASSES  # noqa: E402
from bloodray.nightly.differential import FlagRules, compute_differentials  # noqa: E402

CELLS = (100, 200, 400)
WBC = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil", "ig")
MIDDLE = {"neutrophil": 50.0, "lymphocyte": 30.0, "monocyte": 5.0, "eosinophil": 2.5, "basophil": 0.75}
REMAINDER = 100.0 - sum(MIDDLE.values())
HEALTHY = dict(MIDDLE, neutrophil=50.0 + REMAINDER / 2, lymphocyte=30.0 + REMAINDER / 2, ig=0.0)
RENORMALISED = dict({k: v * 100.0 / sum(MIDDLE.values()) for k, v in MIDDLE.items()}, ig=0.0)
HEALTHY_IG = dict(HEALTHY, neutrophil=HEALTHY["neutrophil"] - 0.3, ig=0.3)

# The rules before issue 11 (bloodray/nightly/differential.py at commit 86df018).
OLD_RANGES = {"neutrophil": (40.0, 60.0), "lymphocyte": (20.0, 40.0), "monocyte": (2.0, 8.0),
              "eosinophil": (1.0, 4.0), "basophil": (0.5, 1.0)}
OLD_IG_PERCENT = 0.9
OLD_NAMES = {"neutrophil": ("neutropenia", "neutrophilia"), "lymphocyte": ("lymphopenia", "lymphocytosis"),
             "monocyte": ("monocytopenia", "monocytosis"), "eosinophil": ("eosinopenia", "eosinophilia"),
             "basophil": ("basopenia", "basophilia")}


def old_flags(counts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The old flags (boolean arrays by flag name) of per-sample counts; flag_low_wbc_count left out."""
    n_wbc = sum(counts[c] for c in WBC_CLASSES)
    out = {}
    for name, (low, high) in OLD_RANGES.items():
        pct = counts[name] * 100.0 / n_wbc
        out[OLD_NAMES[name][0]] = pct < low
        out[OLD_NAMES[name][1]] = pct > high
    out["circulating erythroblasts"] = counts["erythroblast"] > 0
    out["immature granulocytes"] = counts["ig"] * 100.0 / n_wbc > OLD_IG_PERCENT
    return out


def new_flags(counts: dict[str, np.ndarray], rules: FlagRules) -> dict[str, np.ndarray]:
    """The new flags of per-sample counts, through compute_differentials itself."""
    table_ = pa.table({f"count_{c}": pa.array(counts[c], pa.int64()) for c in CLASS_NAMES})
    out = compute_differentials(table_, rules)
    names = {**{f"flag_{c}_{side}": OLD_NAMES[c][i] for c in OLD_NAMES for i, side in enumerate(("low", "high"))},
             "flag_erythroblasts": "circulating erythroblasts", "flag_ig": "immature granulocytes"}
    return {label: out.column(col).to_numpy(zero_copy_only=False) for col, label in names.items()}


def simulate(profile: dict[str, float], erythroblasts_per_100: float, n: int, trials: int,
             rng: np.random.Generator) -> dict[str, np.ndarray]:
    p = np.array([profile.get(c, 0.0) for c in WBC])
    draws = rng.multinomial(n, p / p.sum(), size=trials)
    counts = {c: draws[:, i].astype(np.int64) for i, c in enumerate(WBC)}
    q = erythroblasts_per_100 / (100.0 + erythroblasts_per_100)
    counts["erythroblast"] = (rng.negative_binomial(n, 1.0 - q, size=trials) if q > 0
                              else np.zeros(trials, np.int64))
    counts["platelet"] = np.zeros(trials, np.int64)
    return counts


def abnormal(name: str, pct: float) -> dict[str, float]:
    rest = {k: v for k, v in HEALTHY.items() if k != name}
    scale = (100.0 - pct) / sum(rest.values())
    return dict({k: v * scale for k, v in rest.items()}, **{name: pct})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20000, help="simulated samples per profile and cell count")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rules = FlagRules(min_wbc=0)
    cases: list[tuple[str, dict[str, float], float, str | None]] = [
        ("healthy", HEALTHY, 0.0, None),
        ("healthy (five renormalised)", RENORMALISED, 0.0, None),
        ("healthy, 0.3 % ig", HEALTHY_IG, 0.0, None),
        ("neutrophils 80 %", abnormal("neutrophil", 80.0), 0.0, "neutrophilia"),
        ("lymphocytes 55 %", abnormal("lymphocyte", 55.0), 0.0, "lymphocytosis"),
        ("eosinophils 12 %", abnormal("eosinophil", 12.0), 0.0, "eosinophilia"),
        ("monocytes 15 %", abnormal("monocyte", 15.0), 0.0, "monocytosis"),
        ("ig 3 %", abnormal("ig", 3.0), 0.0, "immature granulocytes"),
        ("erythroblasts 3 per 100 WBC", HEALTHY, 3.0, "circulating erythroblasts"),
    ]
    start = time.monotonic()
    rows, results = [], []
    for label, profile, erb, expected in cases:
        for n in CELLS:
            rng = np.random.default_rng([args.seed, n, len(results)])
            counts = simulate(profile, erb, n, args.trials, rng)
            old, new = old_flags(counts), new_flags(counts, rules)
            if expected is None:  # healthy: any flag at all is a false flag
                old_rate, new_rate = (float(np.mean(np.any(list(f.values()), axis=0))) for f in (old, new))
                target = "<= 5 %" if n in (100, 200) else ""
                which = {k: round(float(np.mean(v)), 4) for k, v in old.items() if np.mean(v) > 0}
                which_new = {k: round(float(np.mean(v)), 4) for k, v in new.items() if np.mean(v) > 0}
            else:
                old_rate, new_rate = float(np.mean(old[expected])), float(np.mean(new[expected]))
                target = ">= 90 %" if n == 200 and expected in (
                    "neutrophilia", "lymphocytosis", "eosinophilia", "monocytosis") else ""
                which, which_new = {}, {}
            results.append({"profile": label, "differential_pct": {k: round(v, 4) for k, v in profile.items()},
                            "erythroblasts_per_100_wbc": erb, "white_cells": n, "flag": expected or "any flag",
                            "old_rate": old_rate, "new_rate": new_rate, "target": target,
                            "old_flag_rates": which, "new_flag_rates": which_new})
            rows.append([label, n, expected or "any flag", f"{100 * old_rate:.1f} %", f"{100 * new_rate:.1f} %",
                         target])
    elapsed = time.monotonic() - start
    result: dict[str, Any] = {
        "trials": args.trials, "seed": args.seed, "seconds": round(elapsed, 1), "cases": results,
        "rules_new": {"confidence": rules.confidence, "erythroblast_per_100_wbc": rules.erythroblast_per_100_wbc,
                      "ig_percent": rules.ig_percent, "interval": "Wilson score"},
        "run": run_facts(),
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "numpy": np.__version__, "platform": platform.platform()},
    }
    healthy100 = next(r for r in results if r["profile"] == "healthy" and r["white_cells"] == 100)
    md = ("# Flags under counting error (perfect classifier simulated)\n\n"
          f"- command: `{result['run']['command']}`; {args.trials} samples per row, seed {args.seed}; "
          f"{elapsed:.1f} s\n- date: {result['run']['date']}; git commit: `{result['run']['git_commit']}`\n\n"
          "Share of simulated samples flagged (healthy rows: any flag; other rows: the profile's own flag).\n\n"
          + table(["profile", "white cells", "flag", "old rules", "new rules", "target"], rows)
          + "\nWhich flags fire on `healthy` at 100 cells, old rules: "
          + ", ".join(f"{k} {100 * v:.1f} %" for k, v in sorted(healthy100["old_flag_rates"].items(),
                                                                  key=lambda kv: -kv[1]))
          + "; new rules: "
          + (", ".join(f"{k} {100 * v:.2f} %" for k, v in healthy100["new_flag_rates"].items()) or "none")
          + ".\n")
    js, mdp = save("flags", result, md)
    print(md)
    print(f"wrote {js} and {mdp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
