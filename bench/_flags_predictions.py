"""Cached predictions of one checkpoint on the PBC val and test splits, for bench/flags.py.

Not part of the package. The split is the one every bloodray run uses (fractions 0.7/0.1/0.2, seed 0,
duplicates dropped by content hash: :func:`bloodray.data.labelled.build_split` through
``_common.pbc_split_rows``). Cells go through :class:`bloodray.predict.CellPredictor` as in a nightly run
(preset, fp32/bf16 self-check, OOD score), one batch at a time. The cache is an ``.npz`` per checkpoint id
under ``bench/.cache/`` (git-ignored), so a re-run of the bench takes seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from _common import REPO, pbc_split_rows

CACHE = REPO / "bench" / ".cache"


def predictions(checkpoint: str | None, threads: int = 2, batch: int = 128) -> dict[str, np.ndarray | str]:
    """``{split}_label``, ``{split}_pred``, ``{split}_unidentified`` (val, test), ``checkpoint_id``, ``checkpoint_uri``,
    ``seconds`` (0 when read from the cache)."""
    import torch

    from bloodray.checkpoint import read_metadata, resolve_checkpoint

    uri = resolve_checkpoint(checkpoint)
    meta = read_metadata(uri)
    path = CACHE / f"flags-{meta.checkpoint_id}.npz"
    if path.exists():
        with np.load(path) as data:
            out = {k: data[k] for k in data.files}
        return {**out, "checkpoint_id": meta.checkpoint_id, "checkpoint_uri": uri, "seconds": 0.0, "cache": str(path)}
    from bloodray.predict import CellPredictor

    torch.set_num_threads(threads)
    predictor = CellPredictor(uri, device="cpu")
    start = time.monotonic()
    out: dict[str, np.ndarray] = {}
    for split in ("val", "test"):
        rows, _dropped = pbc_split_rows(split)
        preds, unid = [], []
        for i in range(0, len(rows), batch):
            images = np.stack([predictor.preset.load(Path(u).read_bytes()) for u, _ in rows[i:i + batch]])
            res = predictor({"image": images})
            preds.append(res["predicted_label"].astype(np.int64))
            unid.append(np.asarray(res["unidentified"], dtype=bool))
        out[f"{split}_label"] = np.array([lab for _, lab in rows], dtype=np.int64)
        out[f"{split}_pred"] = np.concatenate(preds)
        out[f"{split}_unidentified"] = np.concatenate(unid)
    seconds = time.monotonic() - start
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return {**out, "checkpoint_id": meta.checkpoint_id, "checkpoint_uri": uri, "seconds": seconds, "cache": str(path),
            "precision": predictor.precision}
