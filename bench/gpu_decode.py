"""GPU decode in the model actor against the CPU decode path, without Ray (issue 20 item 4).

Runs the nightly job's per-batch work as its actor does, in one process, on real PBC cells when ``--data`` (or
``$BLOODRAY_PBC``) has them, else on synthetic 360 px cells written as JPEGs (a lent GPU machine has no data):

(a) CPU path: ``read_decode_files`` (read, SHA-256, PIL decode with DCT scaling, resize) then the model actor
    (:class:`bloodray.nightly.pipeline.CellPredictorResults`) on ``--device``;
(b) GPU path: ``read_files`` (read, SHA-256) then the same actor, which decodes the batch with nvJPEG
    (``torchvision.io.decode_jpeg(..., device=...)``) and resizes on the device;

and, for the decode alone, images/s of the CPU decoder (one process) and of the device decoder. Each is timed
over ``--images`` cells in batches of 64 after one untimed batch, best of ``--repeats``. Run on a GPU machine::

    python bench/gpu_decode.py --device cuda [--images 4096]

Writes ``bench/results/gpu_decode.json`` and ``.md`` (``--name``). Without CUDA it runs the same code on the CPU
device (a check that the script works, not a measurement of anything).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def cell_files(n: int, tmp: Path) -> list[str]:
    if _common.PBC.is_dir() and any(_common.PBC.iterdir()):
        files = _common.pbc_images()
        return [str(files[i % len(files)]) for i in range(n)]
    from PIL import Image

    from bloodray.classes import CLASS_NAMES
    from bloodray.data.synth import render_cell

    out = []
    for i in range(min(n, 512)):  # 512 distinct cells, repeated: decode cost does not depend on the content
        buf = io.BytesIO()
        render_cell(CLASS_NAMES[i % len(CLASS_NAMES)], np.random.default_rng([4, i]), 360).save(buf, "JPEG", quality=90)
        path = tmp / f"cell{i:04d}.jpg"
        path.write_bytes(buf.getvalue())
        out.append(str(path))
    return [out[i % len(out)] for i in range(n)]


def best_rate(fn, batches: list, repeats: int, sync) -> float:
    fn(batches[0])
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            fn(batch)
        sync()
        best = min(best, time.perf_counter() - start)
    return sum(len(b["uri"]) for b in batches) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--name", default="gpu_decode")
    args = parser.parse_args()
    import torch

    from bloodray.data.decode import CellImageLimits
    from bloodray.data.device_decode import decode_on_device, read_files
    from bloodray.data.stages import ReadLimits, read_decode_files
    from bloodray.nightly.pipeline import CellPredictorResults

    device = torch.device(args.device if args.device != "cuda" or torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    limits = ReadLimits(cell=CellImageLimits())
    result = {"machine": _common.machine_facts(), "run": _common.run_facts(), "device": str(device),
              "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None}
    with tempfile.TemporaryDirectory() as tmp:
        files = cell_files(args.images, Path(tmp))
        batches = [{"uri": np.array(files[i:i + 64], dtype=object),
                    "sample_id": np.array(["s"] * len(files[i:i + 64]), dtype=object)}
                   for i in range(0, len(files), 64)]
        actor = CellPredictorResults(None, device=str(device), precision=args.precision,
                                     cell_limits=limits.cell)
        preset = actor.preset
        read = [read_files(b, limits=limits) for b in batches]
        rates = {
            "decode_cpu": best_rate(lambda b: read_decode_files(b, preset=preset, limits=limits), batches,
                                    args.repeats, sync),
            "decode_device": best_rate(lambda r: decode_on_device(r, preset, device, limits.cell), read,
                                       args.repeats, sync),
            "job_batch_cpu_decode": best_rate(lambda b: actor(read_decode_files(b, preset=preset, limits=limits)),
                                              batches, args.repeats, sync),
            "job_batch_device_decode": best_rate(lambda b: actor(read_files(b, limits=limits)), batches,
                                                 args.repeats, sync),
        }
    result.update({"images": len(files), "real_cells": _common.PBC.is_dir(), "precision": actor.precision,
                   "images_per_s": rates, "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count()})
    rows = [[k, f"{v:.0f}"] for k, v in rates.items()]
    md = (f"# GPU decode in the model actor vs the CPU path (bench/gpu_decode.py)\n\n{_common.facts_markdown(result)}"
          f"\ndevice {device} ({result['gpu'] or 'no GPU'}), precision {actor.precision}, {len(files)} "
          f"{'real PBC' if result['real_cells'] else 'synthetic'} cells, batches of 64, best of {args.repeats}.\n\n"
          + _common.table(["path", "img/s"], rows)
          + f"\nDecode: device / CPU = {rates['decode_device'] / rates['decode_cpu']:.2f}x; the actor's batch "
            f"(read + decode + model + rows): {rates['job_batch_device_decode'] / rates['job_batch_cpu_decode']:.2f}x.\n")
    _common.save(args.name, result, md)
    print(md)


if __name__ == "__main__":
    main()
