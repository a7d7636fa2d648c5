"""Home and away: checkpoints side by side on the PBC test split and on another lab's cells (issue 12).

For each checkpoint (the packaged default, or a checkpoint / run dir): accuracy, balanced accuracy and macro-F1
on the whole PBC test split (1,985 de-duplicated images the models never trained on: fractions 0.7/0.1/0.2,
seed 0, as every bloodray run) and zero-shot on all 511 chula_wbc cells (another laboratory, microscope and
stain; never trained on). Each checkpoint is scored through its own preset, so one trained with stain
normalisation applies it exactly as the nightly job would. BatchNorm uses its running statistics (as shipped);
chula is also scored with test-time batch statistics (every BatchNorm normalising with the batch of 64 shuffled
cells it sees), the normalisation option that needs no retraining. The PBC val accuracy is the column that
selects a model (the issue's rule); the others only report.

Run by hand (a few minutes on 2 CPU cores)::

    .venv/bin/python bench/robust_model.py --checkpoints default,runs/bloodnet-robust-ft

Writes ``bench/results/robust_model.json`` and ``.md`` (``--name`` to change).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import CHULA, decode, pbc_split_rows, predict, scores  # noqa: E402


def main() -> None:
    import torch

    from bloodray.checkpoint import load_checkpoint
    from bloodray.classes import CLASS_TO_INDEX

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", default="default", help="comma-separated: default, checkpoint or run dirs")
    ap.add_argument("--name", default="robust_model", help="results file name under bench/results/")
    args = ap.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
    pbc_rows, _ = pbc_split_rows()
    val_rows, _ = pbc_split_rows("val")
    y_val = np.array([label for _, label in val_rows])
    chula = sorted(CHULA.glob("*/*.jpg"))
    y_pbc = np.array([label for _, label in pbc_rows])
    y_chula = np.array([CLASS_TO_INDEX[f.parent.name] for f in chula])
    result = {"machine": _common.machine_facts(), "run": _common.run_facts(), "n_pbc_test": len(y_pbc),
              "n_chula": len(y_chula), "models": []}
    decoded: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    rows = []
    for name in args.checkpoints.split(","):
        loaded = load_checkpoint(None if name == "default" else name)
        meta = loaded.metadata
        size = meta.input_size
        if size not in decoded:
            decoded[size] = (decode([Path(u) for u, _ in val_rows], size),
                             decode([Path(u) for u, _ in pbc_rows], size), decode(chula, size))
        x_val, x_pbc, x_chula = decoded[size]
        started = time.perf_counter()
        entry = {"checkpoint": name, "id": meta.checkpoint_id, "stain_norm": meta.stain_norm.get("method", "none"),
                 "pbc_val": scores(y_val, predict(loaded.model, x_val, meta.preset())),
                 "pbc_test": scores(y_pbc, predict(loaded.model, x_pbc, meta.preset())),
                 "chula_all": scores(y_chula, predict(loaded.model, x_chula, meta.preset())),
                 "chula_all_batch_stats": scores(y_chula, predict(loaded.model, x_chula, meta.preset(), "batch"))}
        entry["seconds"] = round(time.perf_counter() - started, 1)
        result["models"].append(entry)
        print(entry, flush=True)
        rows.append([f"`{meta.checkpoint_id}`", entry["stain_norm"], entry["pbc_val"]["accuracy"],
                     *(entry["pbc_test"][k] for k in ("accuracy", "macro_f1")),
                     *(entry["chula_all"][k] for k in ("accuracy", "balanced_accuracy", "macro_f1")),
                     entry["chula_all_batch_stats"]["accuracy"]])
    md = ("# PBC test split and chula_wbc zero-shot, side by side (bench/robust_model.py)\n\n"
          + _common.table(["checkpoint", "stain norm", "PBC val acc. (selects)", "PBC test acc.", "PBC test macro-F1",
                           "chula acc.", "chula balanced acc.", "chula macro-F1", "chula acc., batch statistics"], rows)
          + f"\nPBC val: {len(y_val)} images; PBC test: {len(y_pbc)} images; chula_wbc: all {len(y_chula)} cells.\n\n" + _common.facts_markdown(result))
    print(md)
    _common.save(args.name, result, md)


if __name__ == "__main__":
    main()
