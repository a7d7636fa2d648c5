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
from adapt import CHULA, decode, predict, scores  # noqa: E402

#: sRGB (D65) -> XYZ.
_RGB_TO_XYZ = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
_WHITE = np.array([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 sRGB -> float L*a*b*."""
    a = rgb.astype(np.float64) / 255.0
    a = np.where(a > 0.04045, ((a + 0.055) / 1.055) ** 2.4, a / 12.92)
    f = (a @ _RGB_TO_XYZ.T) / _WHITE
    f = np.where(f > 0.008856, np.cbrt(f), 7.787 * f + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """float L*a*b* -> uint8 sRGB (clipped)."""
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], -1)
    xyz = np.where(f > 0.2069, f ** 3, (f - 16 / 116) / 7.787) * _WHITE
    a = np.clip(xyz @ np.linalg.inv(_RGB_TO_XYZ).T, 0, 1)
    a = np.where(a > 0.0031308, 1.055 * a ** (1 / 2.4) - 0.055, 12.92 * a)
    return np.clip(np.round(a * 255), 0, 255).astype(np.uint8)


def lab_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image channel means and standard deviations in L*a*b* (n x 3 each)."""
    labs = [rgb_to_lab(im).reshape(-1, 3) for im in images]
    return np.array([lab.mean(0) for lab in labs]), np.array([lab.std(0) for lab in labs])


def reinhard(images: np.ndarray, ref_mean: np.ndarray, ref_std: np.ndarray,
             source: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Match L*a*b* statistics to the reference: per image, or with one ``source`` (mean, std) for all."""
    out = []
    for im in images:
        lab = rgb_to_lab(im)
        mean, std = source if source is not None else (lab.reshape(-1, 3).mean(0), lab.reshape(-1, 3).std(0))
        out.append(lab_to_rgb((lab - mean) / (std + 1e-6) * ref_std + ref_mean))
    return np.stack(out)


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
