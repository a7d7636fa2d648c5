"""What the per-image decode budget (issue 23 item 7) costs on real PBC crops, and what it saves on a scan bomb.

Run from the repository root (about a minute on 2 busy cores)::

    .venv/bin/python bench/decode_budget.py              # 2,000 PBC files
    .venv/bin/python bench/decode_budget.py --files 500  # quicker

Writes ``bench/results/decode_budget.json`` and ``bench/results/decode_budget.md``.

1. The stage's decode to the model input (128 px, with the default cell limits) of the same PBC files, by
   :func:`bloodray.data.decode.decode_image` as it was before the budget (the module at ``--before``, a git
   revision, loaded from git) and as it is now (work check on the header, deadline on every decoder read),
   alternated image by image, mean of ``--repeats`` passes; the ratio is now / before.
2. A progressive JPEG whose smallest scan repeats ``--bomb-scans`` times: seconds to decode it before, and
   seconds until it is refused now.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import facts_markdown, machine_facts, pbc_images, run_facts, save, table  # noqa: E402

from bloodray.data import decode as now  # noqa: E402
from bloodray.data.preset import EvalPreset  # noqa: E402
from bloodray.data.synth import scan_bomb_jpeg  # noqa: E402
from bloodray.data.stages import read_many  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _module_at(revision: str):
    """bloodray/data/decode.py as it was at ``revision``, imported under another name."""
    text = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:bloodray/data/decode.py"], check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "decode_before.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("decode_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["decode_before"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", default="233367d", help="git revision of the decoder without the budget")
    parser.add_argument("--bomb-scans", type=int, default=20_000)
    args = parser.parse_args()
    result = {"machine": machine_facts(), "run": run_facts(), "before_revision": args.before}
    before = _module_at(args.before)

    blobs = [b for b in read_many([str(p) for p in pbc_images(args.files)]) if isinstance(b, bytes)]
    preset = EvalPreset(128, (0.5,) * 3, (0.5,) * 3)

    cells = {"before": before.CellImageLimits(), "now": now.CellImageLimits()}
    modules = {"before": before, "now": now}
    # Image by image, alternating which goes first: on a shared, loaded machine a load swing between two long
    # blocks once showed a 1.37x "cost" that per-image alternation does not.
    totals = {"before": 0.0, "now": 0.0}
    for rep in range(args.repeats):
        for i, data in enumerate(blobs):
            order = ("before", "now") if (i + rep) % 2 == 0 else ("now", "before")
            for name in order:
                start = time.perf_counter()
                cells[name].check_contrast(preset.resize(modules[name].decode_image(data, target_size=128,
                                                                                   cell=cells[name])))
                totals[name] += time.perf_counter() - start
    best = {k: v / args.repeats for k, v in totals.items()}
    decode = {"images": len(blobs), "before_ms_per_image": 1e3 * best["before"] / len(blobs),
              "now_ms_per_image": 1e3 * best["now"] / len(blobs), "ratio_now_over_before": best["now"] / best["before"]}

    bomb = scan_bomb_jpeg(args.bomb_scans, size=360)
    start = time.perf_counter()
    before.decode_image(bomb, target_size=128)
    bomb_before = time.perf_counter() - start
    start = time.perf_counter()
    try:
        now.decode_image(bomb, target_size=128)
        outcome = "decoded"
    except now.ImageDecodeError as exc:
        outcome = f"{exc.kind}: {exc}"
    bomb_now = time.perf_counter() - start
    bombs = {"bytes": len(bomb), "scans": now.jpeg_scans(bomb), "before_s": bomb_before, "now_s": bomb_now,
             "now_outcome": outcome}
    result.update({"decode": decode, "scan_bomb": bombs,
                   "budget": {"max_decode_work": now.DEFAULT_MAX_DECODE_WORK,
                              "decode_timeout_s": now.DEFAULT_DECODE_TIMEOUT_S}})
    md = ("# Per-image decode budget\n\n" + facts_markdown(result) + "\n"
          + table(["decode to 128 px, cell limits", "images", "ms per image (mean of repeats)"],
                  [[f"before ({args.before})", decode["images"], decode["before_ms_per_image"]],
                   ["now (work check + deadline)", decode["images"], decode["now_ms_per_image"]],
                   ["ratio now / before", "", decode["ratio_now_over_before"]]])
          + "\n" + table(["scan bomb (360 px progressive JPEG)", "bytes", "scans", "seconds"],
                         [["before: decoded", bombs["bytes"], bombs["scans"], bombs["before_s"]],
                          [f"now: {outcome[:60]}", bombs["bytes"], bombs["scans"], bombs["now_s"]]]))
    js, mdp = save("decode_budget", result, md)
    print(md)
    print(f"wrote {js} and {mdp}")


if __name__ == "__main__":
    main()
