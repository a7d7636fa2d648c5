"""What the per-cell thumbnail costs the nightly job: CPU time per cell and bytes per cell.

Run from the repository root (one core, under a minute)::

    .venv/bin/python bench/thumbnails.py              # 800 real PBC images (100 per class)
    .venv/bin/python bench/thumbnails.py --n 200      # quicker

Each image is decoded and resized exactly as the job does (the packaged
model's preset, 128 px), then :func:`bloodray.data.stages.thumbnail_jpeg`
makes its thumbnail. Reported: median and mean milliseconds of the thumbnail
alone and of the decode+resize it follows, and thumbnail bytes per cell
(mean, 95th percentile). Writes ``bench/results/thumbnails.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from _common import facts_markdown, machine_facts, pbc_images, run_facts, save, table
from bloodray.checkpoint import read_metadata, resolve_checkpoint
from bloodray.data.stages import THUMBNAIL_SIZE, thumbnail_jpeg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=800)
    args = parser.parse_args()
    preset = read_metadata(resolve_checkpoint(None)).preset()
    images = pbc_images(args.n)
    decode_ms, thumb_ms, sizes = [], [], []
    for path in images:
        data = path.read_bytes()
        t0 = time.perf_counter()
        image = preset.load(data)
        t1 = time.perf_counter()
        jpeg = thumbnail_jpeg(image)
        t2 = time.perf_counter()
        decode_ms.append(1000 * (t1 - t0))
        thumb_ms.append(1000 * (t2 - t1))
        sizes.append(len(jpeg))
    result = {
        "machine": machine_facts(), "run": run_facts(), "n_images": len(images),
        "input_size": preset.input_size, "thumbnail_size": THUMBNAIL_SIZE,
        "decode_resize_ms": {"median": statistics.median(decode_ms), "mean": statistics.fmean(decode_ms)},
        "thumbnail_ms": {"median": statistics.median(thumb_ms), "mean": statistics.fmean(thumb_ms)},
        "thumbnail_bytes": {"mean": statistics.fmean(sizes), "p95": float(np.percentile(sizes, 95)),
                            "max": max(sizes)},
    }
    rows = [["decode + resize (the job's own work)", f"{result['decode_resize_ms']['median']:.2f}",
             f"{result['decode_resize_ms']['mean']:.2f}", ""],
            [f"thumbnail ({THUMBNAIL_SIZE} px JPEG)", f"{result['thumbnail_ms']['median']:.2f}",
             f"{result['thumbnail_ms']['mean']:.2f}",
             f"mean {result['thumbnail_bytes']['mean']:.0f}, p95 {result['thumbnail_bytes']['p95']:.0f}, "
             f"max {result['thumbnail_bytes']['max']}"]]
    markdown = (f"# Thumbnail cost per cell ({len(images)} PBC images, {preset.input_size} px input)\n\n"
                + table(["step", "median ms", "mean ms", "bytes"], rows) + "\n" + facts_markdown(result))
    print(markdown)
    save("thumbnails", result, markdown)


if __name__ == "__main__":
    main()
