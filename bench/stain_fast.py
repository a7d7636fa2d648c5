"""Stain normalisation cost per image on one core: the float reference against the uint8 fast path (issue 20).

Both implementations of :mod:`bloodray.data.stain` run side by side, interleaved, on the same real PBC cells
decoded and resized by the packaged model's preset, with one torch thread and one OpenCV thread; the best of
``--repeats`` passes of process CPU time is kept (the machine is shared: CPU time, not wall time). Also reports how far the
fast path's output is from the reference (0-255 levels). Run by hand::

    .venv/bin/python bench/stain_fast.py [--images 512] [--repeats 5]

Writes ``bench/results/stain_fast.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import cv2
    import torch

    from bloodray.checkpoint import read_metadata, resolve_checkpoint
    from bloodray.data.stain import reinhard, reinhard_uint8

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    result = {"machine": _common.machine_facts(), "run": _common.run_facts()}
    preset = read_metadata(resolve_checkpoint(None)).preset()
    files = _common.pbc_images(args.images)
    images = np.stack([preset.load(f.read_bytes()) for f in files])
    chunk = 64  # the job's model batch

    def reference(batch):
        with torch.inference_mode():
            return reinhard(torch.as_tensor(batch).permute(0, 3, 1, 2).float().div_(255.0), preset.stain)

    def fast(batch):
        return reinhard_uint8(batch, preset.stain)

    best = {"reference": float("inf"), "fast": float("inf")}
    for _ in range(args.repeats):
        for name, fn in (("reference", reference), ("fast", fast)):
            # CPU time of this (single-threaded) process: on a loaded machine, wall time counts other work too.
            start = time.process_time()
            for i in range(0, len(images), chunk):
                fn(images[i:i + chunk])
            best[name] = min(best[name], (time.process_time() - start) / len(images) * 1e3)
    ref = reference(images).permute(0, 2, 3, 1).numpy() * 255.0
    diff = np.abs(fast(images) * 255.0 - ref)
    result.update({
        "images": len(images), "input_size": preset.input_size, "repeats": args.repeats,
        "ms_per_image": best, "speedup": best["reference"] / best["fast"],
        "difference_levels": {"mean": float(diff.mean()), "p99": float(np.percentile(diff, 99)),
                              "p999": float(np.percentile(diff, 99.9)), "max": float(diff.max()),
                              "share_above_8": float((diff > 8).mean())},
    })
    d = result["difference_levels"]
    md = (f"# Stain normalisation per image, one core (bench/stain_fast.py)\n\n{_common.facts_markdown(result)}\n"
          f"{len(images)} real PBC cells at {preset.input_size} px, batches of {chunk}, best of {args.repeats}.\n\n"
          + _common.table(["path", "CPU ms per image"], [["float L*a*b* in torch (reference)", best["reference"]],
                                                      ["uint8 OpenCV (fast)", best["fast"]]])
          + f"\nSpeed-up {result['speedup']:.1f}x. Fast vs reference, 0-255 levels: mean {d['mean']:.3f}, "
            f"99th pct {d['p99']:.2f}, 99.9th pct {d['p999']:.2f}, max {d['max']:.1f}, "
            f"share above 8 levels {d['share_above_8']:.2e}.\n")
    _common.save("stain_fast", result, md)
    print(md)


if __name__ == "__main__":
    main()
