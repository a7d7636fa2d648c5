"""What the bounded input reads and the not-a-cell checks cost, and whether they refuse any real crop.

Run from the repository root (about a minute on 2 busy cores)::

    .venv/bin/python bench/input_reads.py              # 2,000 PBC files for the timings
    .venv/bin/python bench/input_reads.py --files 500  # quicker

Writes ``bench/results/input_reads.json`` and ``bench/results/input_reads.md``.

1. Reading local files: :func:`bloodray.data.stages.read_many` (regular files
   only, size cap, per-file timeout thread) against fsspec's ``fs.cat`` (what it
   used before issue 14; it expands glob characters), same files, alternated,
   best of ``--repeats``.
2. Decoding to the model input (128 px): :meth:`EvalPreset.load` against the
   stage's decode with the default :class:`~bloodray.data.decode.CellImageLimits`
   (size check on the header, grey-level deviation of the resized image).
3. Every PBC and Chula image through the default cell limits: how many would
   become ``not_a_cell_image`` rows (the target is none), with the smallest
   side and grey-level deviation seen.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from _common import PBC, facts_markdown, machine_facts, pbc_images, run_facts, save, table  # noqa: E402

from bloodray import storage  # noqa: E402
from bloodray.data.decode import CellImageLimits, ImageDecodeError, decode_image  # noqa: E402
from bloodray.data.preset import EvalPreset  # noqa: E402
from bloodray.data.stages import ReadLimits, read_many  # noqa: E402

CHULA = PBC.parent / "chula_wbc"


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = {"machine": machine_facts(), "run": run_facts()}

    paths = [str(p) for p in pbc_images(args.files)]
    fs, _ = storage.filesystem(paths[0])
    read_many(paths)  # page cache warm for both
    new = old = 0.0
    for _ in range(args.repeats):
        new += _best(lambda: read_many(paths, None, ReadLimits()), 1)
        old += _best(lambda: fs.cat(paths, on_error="return"), 1)
    reads = {"files": len(paths), "bounded_read_many_s": new / args.repeats, "fsspec_cat_s": old / args.repeats}

    preset = EvalPreset(128, (0.5,) * 3, (0.5,) * 3)
    cell = CellImageLimits()
    blobs = [b for b in read_many(paths[:500]) if isinstance(b, bytes)]

    def checked() -> None:
        for data in blobs:
            cell.check_contrast(preset.resize(decode_image(data, target_size=128, cell=cell)))

    plain = _best(lambda: [preset.load(b) for b in blobs], args.repeats)
    with_cell = _best(checked, args.repeats)
    decode = {"images": len(blobs), "plain_ms_per_image": 1e3 * plain / len(blobs),
              "cell_checked_ms_per_image": 1e3 * with_cell / len(blobs)}

    refusals = {}
    for name, root in (("pbc", PBC), ("chula_wbc", CHULA)):
        files = sorted(root.glob("*/*.jpg"))
        refused, sides, contrasts = [], [], []
        for chunk in range(0, len(files), 256):
            for path, data in zip(files[chunk:chunk + 256], read_many([str(f) for f in files[chunk:chunk + 256]])):
                try:
                    image = decode_image(data, target_size=128, cell=cell)
                    pixels = preset.resize(image)
                    grey = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
                    contrasts.append(float(grey.std()))
                    cell.check_contrast(pixels)
                except ImageDecodeError as exc:
                    refused.append(f"{path.name}: {exc}")
                with Image.open(path) as im:
                    sides.append(min(im.size))
        refusals[name] = {"images": len(files), "not_a_cell_image": len(refused), "examples": refused[:5],
                          "smallest_side_px": min(sides), "lowest_grey_std": min(contrasts)}

    result.update({"reads": reads, "decode": decode, "cell_limits": refusals,
                   "defaults": {"min_side_px": cell.min_side_px, "max_side_px": cell.max_side_px,
                                "max_aspect_ratio": cell.max_aspect_ratio, "min_contrast": cell.min_contrast}})
    md = ("# Bounded input reads and cell-image checks\n\n" + facts_markdown(result) + "\n"
          + table(["local read of PBC files", "files", "seconds (mean of repeats)"],
                  [["read_many (regular files, cap, timeout)", reads["files"], reads["bounded_read_many_s"]],
                   ["fsspec cat (before)", reads["files"], reads["fsspec_cat_s"]]])
          + "\n" + table(["decode to 128 px", "images", "ms per image (best)"],
                         [["EvalPreset.load", decode["images"], decode["plain_ms_per_image"]],
                          ["with CellImageLimits()", decode["images"], decode["cell_checked_ms_per_image"]]])
          + "\n" + table(["set", "images", "not_a_cell_image", "smallest side px", "lowest grey std"],
                         [[k, v["images"], v["not_a_cell_image"], v["smallest_side_px"], v["lowest_grey_std"]]
                          for k, v in refusals.items()]))
    js, mdp = save("input_reads", result, md)
    print(md)
    print(f"wrote {js} and {mdp}")


if __name__ == "__main__":
    main()
