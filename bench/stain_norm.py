"""Does stain normalisation at inference rescue the packaged model on another lab's cells? (issue 12)

Reinhard normalisation: each image is converted to CIE L*a*b* and its per-channel mean and standard deviation
are matched to reference statistics measured on PBC images (the training lab), then converted back. Measured
on all 511 chula_wbc cells (another lab, microscope and stain), zero-shot with the packaged model:

* raw images (as shipped);
* per-image Reinhard (each image matched with its own statistics);
* dataset Reinhard (all chula images matched with the chula-wide statistics: one colour transform per lab);
* each of the normalised variants with BatchNorm in test-time batch statistics as well;
* and the same per-image normalisation applied to PBC images the model was trained on (what it costs at home).

Nothing here is trained: a model trained on normalised inputs is the next step (needs a GPU; see issue 12).
Run by hand (a few minutes on 2 CPU cores)::

    .venv/bin/python bench/stain_norm.py

Writes ``bench/results/stain_norm.json`` and ``.md``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import CHULA, decode, lab_stats, predict, reinhard, scores  # noqa: E402

def main() -> None:
    import torch

    from bloodray.checkpoint import load_checkpoint
    from bloodray.classes import CLASS_TO_INDEX

    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
    shipped = load_checkpoint(None)
    size, preset, model = shipped.metadata.input_size, shipped.metadata.preset(), shipped.model.eval()
    pbc = _common.pbc_images()
    # Reference from every 25th PBC image; the home-lab check on a disjoint set (offset by one).
    ref_files, home_files = pbc[::25][:400], pbc[1::25][:400]
    ref_mean, ref_std = (s.mean(0) for s in lab_stats(decode(ref_files, size)))
    files = sorted(CHULA.glob("*/*.jpg"))
    y = np.array([CLASS_TO_INDEX[f.parent.name] for f in files])
    x = decode(files, size)
    chula_mean, chula_std = (s.mean(0) for s in lab_stats(x))
    x_home = decode(home_files, size)
    y_home = np.array([CLASS_TO_INDEX[f.parent.name] for f in home_files])

    variants = {"raw": x, "reinhard per image": reinhard(x, ref_mean, ref_std),
                "reinhard dataset": reinhard(x, ref_mean, ref_std, (chula_mean, chula_std))}
    rows, result = [], {"machine": _common.machine_facts(), "run": _common.run_facts(), "n_chula": len(y),
                        "n_pbc_home": len(y_home), "lab_mean": {"pbc": ref_mean.round(2).tolist(),
                                                                "chula": chula_mean.round(2).tolist()},
                        "lab_std": {"pbc": ref_std.round(2).tolist(), "chula": chula_std.round(2).tolist()},
                        "chula": {}, "pbc_home": {}}
    for name, images in variants.items():
        for bn in ("running", "batch"):
            s = scores(y, predict(model, images, preset, bn))
            result["chula"][f"{name} / {bn}"] = s
            rows.append(["chula_wbc (all 511)", name, bn, s["accuracy"], s["balanced_accuracy"], s["macro_f1"]])
    for name, images in {"raw": x_home, "reinhard per image": reinhard(x_home, ref_mean, ref_std)}.items():
        s = scores(y_home, predict(model, images, preset))
        result["pbc_home"][name] = s
        rows.append([f"PBC ({len(y_home)}, not the reference images)", name, "running", s["accuracy"],
                     s["balanced_accuracy"], s["macro_f1"]])
    md = ("# Stain normalisation at inference, packaged model, zero-shot (bench/stain_norm.py)\n\n"
          + _common.table(["images", "normalisation", "BN statistics", "accuracy", "balanced acc.", "macro-F1"],
                          rows)
          + f"\nL*a*b* channel means: PBC {result['lab_mean']['pbc']}, chula {result['lab_mean']['chula']}; "
            f"standard deviations: PBC {result['lab_std']['pbc']}, chula {result['lab_std']['chula']}.\n\n"
          + _common.facts_markdown(result))
    print(md)
    _common.save("stain_norm", result, md)


if __name__ == "__main__":
    main()
