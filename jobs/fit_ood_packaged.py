"""Add the OOD reference to a checkpoint fitted on a labelled folder (used for the packaged default model).

Weights, temperature and review threshold stay as they are; the checkpoint is
re-sealed with ``ood.safetensors`` and its ``ood`` metadata. The split is the
checkpoint's own (its recorded fractions and seed), so the cells fitted on are
training cells and the threshold is set on validation cells it never trained on::

    python jobs/fit_ood_packaged.py --data ../shared/data/pbc            # rewrites bloodray/assets/default_checkpoint
    python jobs/fit_ood_packaged.py --data DIR --checkpoint CK --dest OUT
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    import hashlib

    from bloodray.checkpoint import PACKAGED_CHECKPOINT, export_checkpoint, read_metadata, resolve_checkpoint
    from bloodray.data.labelled import SplitFractions, build_split, rows_of
    from bloodray.evaluation.evaluate import OOD_TRAIN_CELLS, fit_ood_reference

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="labelled folder, <class>/*.jpg")
    p.add_argument("--checkpoint", default=None, help="checkpoint (default: the packaged model)")
    p.add_argument("--dest", default=None, help="where to write (default: the checkpoint itself)")
    p.add_argument("--train-cells", type=int, default=OOD_TRAIN_CELLS)
    args = p.parse_args(argv)
    source = resolve_checkpoint(args.checkpoint)
    dest = args.dest or (str(PACKAGED_CHECKPOINT) if args.checkpoint is None else source)
    meta = read_metadata(source)
    split = (meta.config.get("data", {}) or {}).get("split", {})
    fractions = SplitFractions(split.get("train", 0.7), split.get("val", 0.1), split.get("test", 0.2))
    table, _ = build_split(args.data, fractions, split.get("seed", 0))
    ref, _val = fit_ood_reference(source, rows_of(table, "train"), rows_of(table, "val"),
                                  train_cells=args.train_cells)
    blob = ref.tensors_bytes()
    export_checkpoint(source, dest, ood=ref.metadata(hashlib.sha256(blob).hexdigest()), ood_file=blob)
    print(f"{dest}: OOD reference from {ref.n_train} train / {ref.n_val} val cells, layer {ref.early_layer}, "
          f"threshold {ref.threshold:.3f} (val {ref.quantile:.1%} quantile); id {read_metadata(dest).checkpoint_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
