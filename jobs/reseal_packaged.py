"""Re-calibrate a packaged model on its own PBC split with this version's ``bloodray calibrate`` and ship it.

The split is the one the model was trained on (the checkpoint's recorded fractions and seed; 0.7/0.1/0.2,
seed 0 when it records none), recomputed from the labelled folder. The calibration refits the temperature,
the review threshold, the OOD reference and the self-check batch, seals the val metrics, val confusion
matrix and the quality-gate record, and the result replaces the packaged folder (its checkpoint id changes;
update ``bloodray/assets/models.json``)::

    python jobs/reseal_packaged.py --data /work/shared/data/pbc --name default
    python jobs/reseal_packaged.py --data /work/shared/data/pbc --source OLD_CKPT --dest bloodray/assets/packaged/pbc-only
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from bloodray import packaged, rundir
    from bloodray.checkpoint import export_checkpoint, read_metadata
    from bloodray.data.labelled import SplitFractions, build_split, write_parquet
    from bloodray.evaluation.evaluate import calibrate_run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the labelled folder the model was trained on, <class>/*.jpg")
    p.add_argument("--name", default=None, help="packaged model to re-seal in place (default, pbc-only, ...)")
    p.add_argument("--source", default=None, help="checkpoint folder to re-seal (instead of --name)")
    p.add_argument("--dest", default=None, help="where to write (default: the packaged model's folder)")
    p.add_argument("--force", action="store_true", help="seal even if the quality gate fails (recorded)")
    args = p.parse_args(argv)
    if (args.name is None) == (args.source is None):
        p.error("give --name or --source")
    source = str(packaged.folder(f"{packaged.SCHEME}{args.name}")) if args.name else args.source
    dest = args.dest or source
    split = (read_metadata(source).config.get("data", {}) or {}).get("split", {})
    fractions = SplitFractions(split.get("train", 0.7), split.get("val", 0.1), split.get("test", 0.2))
    with tempfile.TemporaryDirectory(prefix="reseal-") as tmp:
        run = os.path.join(tmp, "run")
        table, _ = build_split(args.data, fractions, split.get("seed", 0))
        write_parquet(table, rundir.split_manifest(run))
        result = calibrate_run(run, checkpoint=source, force=args.force)
        export_checkpoint(result["checkpoint"], dest)
    meta = read_metadata(dest)
    cal = meta.calibration
    print(f"{dest}: {meta.checkpoint_id}; val {cal['val_size']} cells, accuracy {cal['val_accuracy']:.4f}; "
          f"test accuracy {cal['test']['accuracy']:.4f}; temperature {meta.temperature:.3f}; "
          f"gate {'passed' if cal['gate']['passed'] else 'FAILED: ' + '; '.join(cal['gate']['failures'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
