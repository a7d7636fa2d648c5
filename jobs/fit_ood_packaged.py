"""Refit the OOD reference (per-class format) of any checkpoint on a labelled folder, and re-seal it.

Weights, temperature, review threshold and calibration stay as they are; the
checkpoint is re-sealed with ``ood.safetensors`` and its ``ood`` metadata
(:func:`bloodray.evaluation.evaluate.refit_ood`). The split is the
checkpoint's own (its recorded fractions and seed), so the Gaussians are
fitted on its training cells and the threshold and per-class references are
set on validation cells it never trained on. Use it on the packaged model, on
a checkpoint whose reference predates the per-class format (the nightly job
warns about those), or on a newly trained model::

    python jobs/fit_ood_packaged.py --data ../shared/data/pbc             # rewrites bloodray/assets/default_checkpoint
    python jobs/fit_ood_packaged.py --data DIR --checkpoint CK            # refits CK in place
    python jobs/fit_ood_packaged.py --data DIR --checkpoint CK --dest OUT # writes a refitted copy
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from bloodray.checkpoint import PACKAGED_CHECKPOINT, read_metadata
    from bloodray.evaluation.evaluate import OOD_TRAIN_CELLS, refit_ood
    from bloodray.ood import MIN_CLASS_CELLS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="labelled folder, <class>/*.jpg (the checkpoint's training data)")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder or URI (default: the packaged model)")
    p.add_argument("--dest", default=None, help="where to write (default: the checkpoint itself)")
    p.add_argument("--train-cells", type=int, default=OOD_TRAIN_CELLS)
    args = p.parse_args(argv)
    dest = args.dest or (str(PACKAGED_CHECKPOINT) if args.checkpoint is None else None)
    dest, ref = refit_ood(args.checkpoint, args.data, dest, train_cells=args.train_cells)
    small = sorted(k for k, v in (ref.per_class or {}).items() if v.n_val < MIN_CLASS_CELLS)
    joined = ref.extra.get("train_reference", {})
    print(f"{dest}: OOD Gaussians from {ref.n_train} train cells, reference of {ref.n_val} cells (val"
          + (f" and {joined['cells']} unseen train cells, KS vs val {joined['ks']:.3f} p {joined['p_value']:.2g}"
             if joined.get("joined") else "") + f"), layer {ref.early_layer}, "
          f"threshold {ref.threshold:.3f} (val {ref.quantile:.1%} quantile), per-class references for "
          f"{len(ref.per_class or {})} classes" + (f" (pooled for {', '.join(small)}: too few val cells)" if small
                                                    else "") + f"; id {read_metadata(dest).checkpoint_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
