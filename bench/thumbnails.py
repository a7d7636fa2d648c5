"""What the per-cell thumbnail costs the nightly job: CPU time per cell and bytes per cell, before/after issue 22.

Run from the repository root (one core, about a minute)::

    .venv/bin/python bench/thumbnails.py              # 800 real PBC images (100 per class)
    .venv/bin/python bench/thumbnails.py --n 200      # quicker

Each image is decoded as the job does (the packaged model's preset: JPEG DCT
scaling, then the resize to 128 px), then both thumbnails are made, side by
side on the same image, in alternating order:

- before (up to issue 22): 80 px, made in the model actor from the resized image;
- now: :data:`bloodray.data.stages.THUMBNAIL_SIZE` px, made in the decode
  stage from the image before the resize (:func:`bloodray.data.stages.thumbnail_jpeg`).

Reported: median and mean CPU milliseconds (process time, steadier than wall
time on a shared machine) of each step, the per-image cost of the job's
decode stage with either thumbnail and their ratio, and thumbnail bytes per
cell. Writes ``bench/results/thumbnails.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from _common import facts_markdown, machine_facts, pbc_images, run_facts, save, table
from bloodray.checkpoint import read_metadata, resolve_checkpoint
from bloodray.data.stages import THUMBNAIL_SIZE, thumbnail_jpeg

#: The thumbnail size before issue 22 (made from the resized model input).
BEFORE_SIZE = 80


def _cpu_ms(fn):
    t = time.process_time_ns()
    out = fn()
    return out, (time.process_time_ns() - t) / 1e6


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "mean": statistics.fmean(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=800)
    args = parser.parse_args()
    preset = read_metadata(resolve_checkpoint(None)).preset()
    images = pbc_images(args.n)
    ms: dict[str, list[float]] = {"decode": [], "resize": [], "before": [], "now": []}
    sizes: dict[str, list[int]] = {"before": [], "now": []}
    pixels: list[int] = []
    for i, path in enumerate(images):
        data = path.read_bytes()
        decoded, t_decode = _cpu_ms(lambda: preset.decode(data))
        image, t_resize = _cpu_ms(lambda: preset.resize(decoded))
        steps = [("before", lambda: thumbnail_jpeg(image, BEFORE_SIZE)),
                 ("now", lambda: thumbnail_jpeg(decoded, THUMBNAIL_SIZE))]
        for name, fn in (steps if i % 2 else steps[::-1]):  # alternate: neither gets the warmer cache
            jpeg, t = _cpu_ms(fn)
            ms[name].append(t)
            sizes[name].append(len(jpeg))
        ms["decode"].append(t_decode)
        ms["resize"].append(t_resize)
        pixels.append(max(decoded.size))
    stage = {name: [d + r + t for d, r, t in zip(ms["decode"], ms["resize"], ms[name])] for name in ("before", "now")}
    result = {
        "machine": machine_facts(), "run": run_facts(), "n_images": len(images), "input_size": preset.input_size,
        "thumbnail_size": {"before": BEFORE_SIZE, "now": THUMBNAIL_SIZE},
        "decoded_long_side_px": _stats([float(p) for p in pixels]),
        "cpu_ms": {name: _stats(v) for name, v in ms.items()},
        "stage_cpu_ms": {name: _stats(v) for name, v in stage.items()},
        "stage_ratio_now_over_before": statistics.fmean(stage["now"]) / statistics.fmean(stage["before"]),
        "thumbnail_bytes": {name: {"mean": statistics.fmean(v), "p95": float(np.percentile(v, 95)), "max": max(v)}
                            for name, v in sizes.items()},
    }

    def row(label: str, key: str, nbytes: str = "") -> list[str]:
        return [label, f"{result['cpu_ms'][key]['median']:.3f}", f"{result['cpu_ms'][key]['mean']:.3f}", nbytes]

    def size_text(name: str) -> str:
        b = result["thumbnail_bytes"][name]
        return f"mean {b['mean']:.0f}, p95 {b['p95']:.0f}, max {b['max']}"

    rows = [row("decode (JPEG DCT scaling)", "decode"), row(f"resize to {preset.input_size} px", "resize"),
            row(f"thumbnail before: {BEFORE_SIZE} px from the resized image", "before", size_text("before")),
            row(f"thumbnail now: <= {THUMBNAIL_SIZE} px from the decoded image", "now", size_text("now"))]
    for name in ("before", "now"):
        s = result["stage_cpu_ms"][name]
        rows.append([f"decode stage with the thumbnail {name}", f"{s['median']:.3f}", f"{s['mean']:.3f}", ""])
    markdown = (f"# Thumbnail cost per cell ({len(images)} PBC images, {preset.input_size} px input, decoded at a "
                f"median {result['decoded_long_side_px']['median']:.0f} px)\n\n"
                + table(["step (CPU time per image)", "median ms", "mean ms", "thumbnail bytes"], rows)
                + f"\nDecode stage, now / before (mean CPU ms): {result['stage_ratio_now_over_before']:.3f}\n\n"
                + facts_markdown(result))
    print(markdown)
    save("thumbnails", result, markdown)


if __name__ == "__main__":
    main()
