"""The ``bloodray`` command line: parse arguments, build a typed config, call one library function.

Subcommands: ``train``, ``evaluate``, ``calibrate``, ``export``, ``classify``,
``query``, ``vacuum``, ``report``, ``models``, ``synth``, ``demo``, ``compare``, ``review``. Expected failures (bad config, missing data,
unreadable checkpoint, storage errors) print one line naming the culprit and
exit with the status :mod:`bloodray.exit_codes` gives them (2 for a problem with
the input, config or storage); nothing already written is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Callable, Sequence

# Only light imports here: --help, --version and query must not wait for torch
# (bloodray.checkpoint, bloodray.models and bloodray.data.labelled import it).
from bloodray.cli_common import add_storage_arguments, run_date_argument, storage_options
from bloodray import exit_codes
from bloodray.cli_docs import add_docs_parsers
from bloodray.cli_outputs import add_output_root_parsers
from bloodray.config import ConfigError, load_config
from bloodray.defaults import default_config_path, describe_default_config
from bloodray.logs import exit_on_sigterm, own_process_output, terminated_by
from bloodray.storage import StorageError

#: What ``bloodray --help`` opens with (the module docstring is for developers).
DESCRIPTION = """\
bloodray classifies peripheral blood cell images (PBC classes: basophil,
eosinophil, erythroblast, ig, lymphocyte, monocyte, neutrophil, platelet),
counts per-sample differentials with flags, and writes everything to Delta Lake tables.
Research use only: not a diagnostic device.

Typical session:
  bloodray classify --set input.uri=/data/archive --set output.uri=/data/out --date 2026-01-01
  bloodray query "SELECT * FROM differentials WHERE any_flag" --output /data/out
  bloodray report --output /data/out

Every command runs from any directory: without --config it uses the packaged
defaults (the same files as configs/ in the repository). `bloodray COMMAND --help`
lists a command's options. Exit status: 0 done; 2 a problem with the input,
config or storage, named in one line; classify also: 3 nothing to do (no
images for the date), 4 committed under the domain-shift alarm, 5 the cluster
or storage failed (try again later), 6 the alarm with shift.on_alarm=fail."""


#: Errors a command reports as one line (module, class). Imported lazily: a command that never loaded a module
#: (the pack trainer on a GPU box without Ray or DuckDB) cannot have raised its error.
EXPECTED_ERRORS: tuple[tuple[str, str], ...] = (
    ("bloodray.checkpoint", "CheckpointError"), ("bloodray.data.labelled", "DatasetError"),
    ("bloodray.models", "UnknownModelError"), ("bloodray.nightly.config", "ClassifyError"),
    ("bloodray.analysis.query", "QueryError"), ("bloodray.analysis.report", "ReportError"),
    ("bloodray.review.decisions", "ReviewError"), ("bloodray.train.pack", "PackError"),
    ("bloodray.nightly.tables", "TableError"), ("bloodray.bounded_read", "InputReadError"),
    ("bloodray.quality_gate", "QualityGateError"))


def _handled_errors() -> tuple[type[BaseException], ...]:
    """Every error a command reports as one line: the expected ones and the infrastructure's."""
    return _expected_errors() + exit_codes.infrastructure_errors()


def _expected_errors() -> tuple[type[BaseException], ...]:
    import importlib

    found: list[type[BaseException]] = [ConfigError, StorageError, FileNotFoundError, PermissionError]
    for module, name in EXPECTED_ERRORS:
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
        else:
            try:
                found.append(getattr(importlib.import_module(module), name))
            except ImportError:
                continue
    return tuple(found)


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    """``--config FILE`` and repeatable ``--set dotted.key=value``.

    ``default_config`` names a packaged default (``configs/train/bloodnet.yaml``
    or ``train/bloodnet.yaml``), so the command works from any directory; a
    ``--config`` given by the user is a path relative to the working directory.
    """
    parser.add_argument("--config", default=default_config_path(default_config), metavar="YAML",
                        help=f"YAML config (default: {describe_default_config(default_config)})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=5 (repeatable)")


def cmd_train(args) -> int:
    from bloodray.train.ray_trainer import load_train_config, run_training

    cfg = load_train_config(args.config, args.overrides)
    result = run_training(cfg)
    print(f"best checkpoint: {result.best_checkpoint}")
    if result.test_metrics:
        print(f"test accuracy {result.test_metrics['accuracy']:.4f}, macro-F1 {result.test_metrics['macro_f1']:.4f} "
              f"(n={result.test_metrics['n']}); files in {result.test_metrics['output_uri']}")
    return 0


def cmd_evaluate(args) -> int:
    from bloodray.evaluation.evaluate import evaluate_folder, evaluate_run
    from bloodray import storage

    opts = storage_options(args)
    if args.run:
        result = evaluate_run(args.run, args.split, opts, args.output, checkpoint=args.checkpoint, tta=args.tta)
    elif args.data:
        output = args.output or storage.join("eval", args.split)
        result = evaluate_folder(args.data, args.checkpoint, output, args.split, args.seed, opts, tta=args.tta)
    else:
        raise ConfigError("evaluate: give --run RUN_DIR, or --data FOLDER [--checkpoint CKPT]")
    print(result.table())
    print(f"files: {result.output_uri}")
    return 0


def cmd_calibrate(args) -> int:
    from bloodray.evaluation.evaluate import calibrate_run

    result = calibrate_run(args.run, storage_options(args), args.max_review_share, checkpoint=args.checkpoint,
                           force=args.force)
    gate = result["gate"]
    print(f"val: {result['val_size']} cells, accuracy {result['val_accuracy']:.4f}, lowest class recall "
          f"{min((r for r in result['val_recall'].values() if r is not None), default=float('nan')):.4f}; quality gate "
          + ("passed" if gate["passed"] else f"FAILED, sealed anyway (--force): {'; '.join(gate['failures'])}"))
    test = result["test"]
    print(f"temperature {result['temperature']:.3f}; review threshold {result['review_threshold']:.3f} "
          f"(chosen on val for <= {args.max_review_share:.0%} flagged)")
    print(f"test ECE (15 bins): {test['ece_before']:.4f} before, {test['ece_after']:.4f} after")
    print(f"test review: {test['review']['flagged_share']:.1%} of cells flagged, "
          f"{test['review']['errors_caught']:.1%} of {test['review']['n_errors']} errors caught")
    if "ood" in test:
        print(f"test OOD: {test['ood']['unidentified_share']:.1%} of cells unidentified, "
              f"{test['ood']['unidentified_or_review_share']:.1%} unidentified or in review")
    print(f"calibrated checkpoint: {result['checkpoint']}")
    return 0


def cmd_export(args) -> int:
    from bloodray.checkpoint import export_checkpoint
    from bloodray.inference_precision import export_with_selfcheck

    if args.selfcheck_images:
        dest = export_with_selfcheck(args.checkpoint, args.to, args.selfcheck_images, storage_options(args))
    else:
        dest = export_checkpoint(args.checkpoint, args.to, storage_options(args))
    print(f"exported to {dest}")
    return 0


def cmd_models(args) -> int:
    from bloodray import packaged
    from bloodray.models import model_table

    rows = model_table()
    print("architectures (model.name):")
    print(f"{'name':<16}{'input':>7}{'params':>15}  imagenet weights")
    for row in rows:
        print(f"{row['name']:<16}{row['input_size']:>5}px{row['params']:>15,}  {row['imagenet_weights'] or '-'}")
    print("\npackaged models (model.checkpoint=packaged:<name>; the default also as null or default):")
    for model in packaged.describe():
        figures = ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in model["figures"].items())
        print(f"{model['selector'] + (' (default)' if model['default'] else ''):<30}{model['checkpoint_id']}  "
              f"{model['summary']}\n{'':<30}{figures} ({model['figures_source']})")
    return 0


def cmd_synth(args) -> int:
    from bloodray.data import synth as synth

    if args.kind == "labelled":
        counts = synth.write_labelled_dataset(args.out, args.per_class, size=args.size, seed=args.seed,
                                              storage_options=storage_options(args))
        print(f"wrote {sum(counts.values())} labelled images to {args.out}: {json.dumps(counts)}")
    else:
        samples = synth.default_samples(args.samples, args.cells, seed=args.seed)
        rows = synth.write_archive(args.out, samples, layout=args.layout, size=args.size, seed=args.seed,
                                   storage_options=storage_options(args))
        print(f"wrote {len(rows)} images of {len(samples)} samples to {args.out} ({args.layout} layout)")
        for spec in samples:
            print(f"  {spec.sample_id}: {json.dumps({k: v for k, v in spec.counts.items() if v})}")
    return 0


def add_classify_arguments(parser: argparse.ArgumentParser, default_config: str | None = None) -> None:
    """The classification job's options: ``--config``, ``--set`` and the ``--date``/``--incremental`` shortcuts."""
    parser.add_argument("--config", "-c", metavar="YAML", default=default_config_path(default_config),
                        help="config file, e.g. configs/classify/nightly.yaml "
                             f"(default: {describe_default_config(default_config)})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set run.date=2024-05-01 (repeatable)")
    parser.add_argument("--date", metavar="YYYY-MM-DD", help="shortcut for --set run.date=YYYY-MM-DD")
    parser.add_argument("--incremental", action="store_true", help="shortcut for --set run.incremental=true")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON run summary on stdout instead of the human one, also when the run "
                             "fails (status and exit_code as the exit status says)")


def classify_config_from_args(args: argparse.Namespace):
    """The validated :class:`~bloodray.nightly.config.ClassifyConfig` of parsed ``classify`` arguments."""
    from bloodray.nightly.config import ClassifyConfig

    overrides = list(getattr(args, "overrides", None) or [])
    if getattr(args, "date", None):
        overrides.append(f"run.date={args.date}")
    if getattr(args, "incremental", False):
        overrides.append("run.incremental=true")
    return load_config(ClassifyConfig, getattr(args, "config", None), overrides)


def cmd_classify(args) -> int:
    """Run the nightly job; the exit status and ``--json`` summary follow :mod:`bloodray.exit_codes`."""
    from bloodray.nightly.summary import failure_summary, run_summary

    cfg = None
    try:
        cfg = classify_config_from_args(args)
        result = _run_classification(cfg)
    except _handled_errors() as exc:
        if terminated_by() is not None:
            raise  # a signal, reported by main()
        code = exit_codes.for_exception(exc)
        print(f"bloodray classify: error: {exc}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps(failure_summary(exc, code, cfg.run.date if cfg else None,
                                             cfg.output.uri if cfg else None)))
        return code
    print(json.dumps(run_summary(result)) if getattr(args, "json", False) else result.describe())
    for warning in (result.flags_warning(), result.shift_warning()):
        if warning:
            print(warning, file=sys.stderr)
    return exit_codes.for_run(result)


def _run_classification(cfg):
    from bloodray.nightly_job import classify

    try:
        return classify(cfg)
    except OSError as exc:
        # Bad inputs are error rows, never exceptions: an OS error that reaches here is the output store's
        # (a full disk, a read-only folder, a path under a file), so name the output.
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise StorageError(f"output.uri {cfg.output.uri}: cannot write the run's outputs: "
                           f"{type(exc).__name__}: {text}") from exc


def cmd_report(args) -> int:
    from bloodray.analysis.report import write_report

    path = write_report(args.output, run_date=args.date, dest=args.dest, storage_options=storage_options(args))
    print(f"report: {path}")
    return 0


def cmd_demo(args) -> int:
    from bloodray.demo import load_demo_config, run_demo

    run_demo(load_demo_config(args.config, args.overrides))
    return 0


def cmd_compare(args) -> int:
    from bloodray.train.compare import load_compare_config, run_comparison

    result = run_comparison(load_compare_config(args.config, args.overrides))
    print(result.table[result.table.index("## Summary"):])
    print("files: " + ", ".join(result.files))
    for failed in result.failed:
        print(f"bloodray compare: {failed['label']} failed: {failed['error']}", file=sys.stderr)
    return 1 if result.failed else 0


def cmd_pack(args) -> int:
    from bloodray.data.labelled import SplitFractions
    from bloodray.train.pack import build_pack

    summary = build_pack(args.root, args.output, args.size, image_format=args.format, quality=args.quality,
                         seed=args.seed, fractions=SplitFractions(), splits=args.splits.split(","))
    print(json.dumps(summary, indent=2))
    return 0


def cmd_train_packed(args) -> int:
    from bloodray.config import load_config, save_config
    from bloodray.train.pack import PackedTrainConfig, train_packed

    cfg = load_config(PackedTrainConfig, args.config, args.overrides)
    cfg.validate()
    # The final config is saved beside the outputs before any work.
    save_config(cfg, os.path.join(cfg.output, "config.yaml"))
    result = train_packed(cfg)
    summary = {k: result.get(k) for k in ("model", "input_size", "parameters", "epochs_run", "best_epoch",
                                         "train_time_s", "train_images_per_s", "eval_images_per_s", "device")}
    for split in ("val", "test"):
        if split in result:
            summary[split] = {k: result[split][k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}
    print(json.dumps(summary, indent=2))
    return 0


def add_pack_parsers(sub) -> None:
    """``bloodray pack`` and ``bloodray train-packed``: the lone-GPU-box path without Ray."""
    p = sub.add_parser("pack", help="resize a labelled folder once into a Parquet pack for train-packed")
    p.add_argument("--root", required=True, help="labelled image folder (local path or s3:// URI)")
    p.add_argument("--output", required=True, help="pack file to write (.parquet)")
    p.add_argument("--size", type=int, required=True, help="square side in px the model will be trained at")
    p.add_argument("--format", default="WEBP", help="image format of the re-encoded images (WEBP, JPEG, PNG)")
    p.add_argument("--quality", type=int, default=90, help="quality of the re-encoded images")
    p.add_argument("--seed", type=int, default=0, help="split seed (must match the training config)")
    p.add_argument("--splits", default="train,val,test", help="which splits to include")
    p.set_defaults(func=cmd_pack)
    p = sub.add_parser("train-packed", help="train one model in one process from a pack (a GPU box without Ray)")
    add_config_arguments(p, "configs/train_packed.yaml")
    p.set_defaults(func=cmd_train_packed)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``bloodray`` command."""
    parser = argparse.ArgumentParser(prog="bloodray", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model with Ray Train")
    add_config_arguments(p, "configs/train/bloodnet.yaml")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="accuracy, per-class P/R/F1 and confusion matrix on held-out images")
    p.add_argument("--run", help="training run dir (<storage_path>/<name>): evaluates its best checkpoint on its split")
    p.add_argument("--data", help="labelled folder or s3:// prefix (its deterministic split is recomputed)")
    p.add_argument("--checkpoint", help="checkpoint dir or run dir (default: the packaged model)")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--seed", type=int, default=None, help="split seed (default: the checkpoint's)")
    p.add_argument("--output", help="where to write metrics files (default: <run>/eval/<split> or ./eval/<split>)")
    p.add_argument("--tta", action="store_true", help="average the 8 flips/rotations of each image")
    add_storage_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("calibrate", help="fit temperature and review threshold on a run's val split")
    p.add_argument("--run", required=True, help="training run dir (<storage_path>/<name>)")
    p.add_argument("--checkpoint", help="checkpoint to calibrate (default: the run's best)")
    p.add_argument("--max-review-share", type=float, default=0.05, help="review budget: share of cells flagged")
    p.add_argument("--force", action="store_true",
                   help="seal a checkpoint that misses the quality gate's minimums anyway (recorded as forced; "
                        "classify still refuses it)")
    add_storage_arguments(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("export", help="copy a checkpoint's weights and metadata (no optimizer state)")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir or run dir")
    p.add_argument("--to", required=True, help="destination folder or s3:// prefix")
    p.add_argument("--selfcheck-images", metavar="DIR", default=None,
                   help="seal a precision self-check batch of images from DIR (real cells the model has not "
                        "trained on) and their fp32 logits into the copy")
    add_storage_arguments(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("models", help="list registered architectures (input size, parameters) and the packaged "
                                      "models by short name with their model-card figures")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("synth", help="write synthetic labelled cells or a synthetic slide archive")
    p.add_argument("kind", choices=["labelled", "archive"])
    p.add_argument("--out", required=True, help="local folder or s3:// prefix")
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--samples", type=int, default=6)
    p.add_argument("--cells", type=int, default=60, help="cells per sample (archive)")
    p.add_argument("--layout", default="folders", choices=["folders", "tar"])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    add_storage_arguments(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("classify", help="classify a slide archive into Delta tables of predictions and differentials")
    add_classify_arguments(p, default_config="configs/classify/nightly.yaml")
    p.set_defaults(func=cmd_classify)

    add_output_root_parsers(sub)

    p = sub.add_parser("report", help="HTML report with plots for a run date")
    p.add_argument("--output", required=True, help="output root of the classify job")
    p.add_argument("--date", default=None, type=run_date_argument, help="run date YYYY-MM-DD (default: latest)")
    p.add_argument("--dest", default=None, help="where to write the report (default: <output>/reports/...)")
    add_storage_arguments(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="end-to-end demo on synthetic data (what `make demo` runs)")
    add_config_arguments(p, "configs/demo.yaml")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("compare", help="train several models on one split; write Table 2 (per-class P/R/F1, "
                                       "accuracy, params, timings)")
    add_config_arguments(p, "configs/compare/cpu.yaml")
    p.set_defaults(func=cmd_compare)
    add_pack_parsers(sub)
    add_docs_parsers(sub, parser)
    add_output_arguments(parser, sub)
    return parser


def add_output_arguments(parser: argparse.ArgumentParser, sub=None) -> None:
    """``--version`` and the console verbosity flags, on the main parser and (verbosity) on every subcommand.

    The flags work before or after the subcommand (``bloodray -q classify`` and
    ``bloodray classify --quiet``); a subcommand's flag wins.
    """
    from bloodray import __version__

    parser.add_argument("--version", action="version", version=f"bloodray {__version__}")
    # Short forms only on the main parser, so no subcommand's own options can clash with them.
    targets = [(parser, 0, True)] + [(p, argparse.SUPPRESS, False) for p in (sub.choices.values() if sub else [])]
    for target, default, short in targets:
        group = target.add_mutually_exclusive_group()
        group.add_argument(*(["-q"] if short else []), "--quiet", dest="verbosity", action="store_const", const=-1,
                           default=default, help="warnings and errors only, no progress bars")
        group.add_argument(*(["-v"] if short else []), "--verbose", dest="verbosity", action="store_const", const=1,
                           default=default, help="debug lines, and Ray's own console output and progress bars")


def run(argv: Sequence[str] | None, handler: Callable | None = None) -> int:
    """Parse ``argv`` and run the chosen command; expected errors become one line on stderr.

    Console output (bloodray's log lines, Ray's, progress bars) is configured
    here, once per command, from ``--quiet``/``--verbose``.
    """
    from bloodray.logs import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "verbosity", 0))
    try:
        return (handler or args.func)(args)
    except Exception as exc:
        # A signal's SystemExit, or the error a library made of it, is reported by main(), not as bad input.
        if terminated_by() is None and isinstance(exc, _handled_errors()):
            print(f"bloodray {args.command}: error: {exc}", file=sys.stderr)
            return exit_codes.for_exception(exc)
        raise


def main() -> None:
    """Console-script entry point."""
    exit_on_sigterm()
    own_process_output()
    try:
        code = run(sys.argv[1:])
        sys.stdout.flush()
    except BrokenPipeError:
        # `bloodray query ... | head`: the reader left. Point stdout at
        # /dev/null so the interpreter's final flush does not fail again, and
        # exit like other Unix tools killed by SIGPIPE (128 + 13), no traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 141
    except BaseException:
        signum = terminated_by()
        if signum is None:
            raise
        # One line, not the traceback of whatever was running (DuckDB turns it into "Query interrupted").
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
        print(f"bloodray {command}: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        _leave_after_signal(128 + signum)
    sys.exit(code)


def _leave_after_signal(code: int) -> None:
    """Exit with ``code`` after a signal: exit handlers run (Ray's shutdown), interpreter finalisation does not.

    A native library's threads may still be unwinding the work the signal interrupted (DuckDB's, after
    ``con.interrupt()``). Finalisation ends any thread that then asks for the GIL with a forced unwind, which
    DuckDB's C++ catches without rethrowing: glibc aborts ("FATAL: exception not rethrown") and the status
    becomes SIGABRT's instead of 128 + the signal (about 1 run in 10 of `bloodray query` stopped by SIGTERM).
    """
    import atexit

    atexit._run_exitfuncs()  # noqa: SLF001 - what sys.exit would run first; os._exit skips it
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone or a stream closed: nothing left to say there
            pass
    os._exit(code)
