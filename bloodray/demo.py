"""The end-to-end demo behind ``make demo``.

On local Ray and local disk: synthetic labelled cells (or a real folder via
``--set data.root=...``), a short bloodnet training with 2 Ray Train workers,
calibration of its confidence on the validation split, a synthetic slide
archive with known differentials, its nightly classification, and a printed
per-sample differential table with flags.
"""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from bloodray.config import ConfigError, load_config
from bloodray.train.recipe import Recipe


@dataclass
class DemoData:
    #: labelled training images; null = generate synthetic cells.
    root: str | None = None
    #: synthetic labelled cells per class.
    per_class: int = 80
    #: side of the synthetic cells (and archive images) in px.
    size: int = 96
    #: seed of the synthetic labelled cells.
    seed: int = 0


@dataclass
class DemoArchive:
    #: samples (slides) in the synthetic archive, each with a known differential (at least 2).
    samples: int = 6
    #: cells per sample.
    cells_per_sample: int = 120
    #: ``folders`` (a folder per sample) or ``tar`` (tar shards).
    layout: str = "folders"
    #: seed of the synthetic archive.
    seed: int = 1

    def validate(self, prefix: str) -> None:
        if self.samples < 2:
            raise ConfigError(f"{prefix}.samples: need at least 2 (one normal, one abnormal)")


@dataclass
class DemoTrain(Recipe):
    """The demo's training run: the recipe keys of ``train.*`` (:class:`~bloodray.train.recipe.Recipe`; the demo's
    short schedule is set in ``configs/demo.yaml``) plus shortcuts for the model and the workers."""

    #: registry name of the model (``model.name`` of the training run).
    model: str = "bloodnet"
    #: input side in px (``model.input_size``).
    input_size: int = 96
    #: batch normalisation after each convolution (``model.kwargs.batch_norm``).
    batch_norm: bool = True
    #: Ray Train workers (``scaling.num_workers``).
    num_workers: int = 2


@dataclass
class DemoConfig:
    """Configuration of the demo (``configs/demo.yaml``)."""

    #: the demo's folder (emptied first): cells, archive, training run, outputs, report.
    workdir: str = "demo-output"
    #: archive date folder and output partition; null = today (UTC).
    date: str | None = None
    data: DemoData = field(default_factory=DemoData)
    archive: DemoArchive = field(default_factory=DemoArchive)
    train: DemoTrain = field(default_factory=DemoTrain)
    #: seal and classify with the trained model even when it misses the quality gate (:mod:`bloodray.quality_gate`):
    #: only for smoke runs too short to train a real model; the demo then says so.
    force_gate: bool = False


def load_demo_config(path: str | None, overrides: list[str]) -> DemoConfig:
    """Load the demo config (missing file = the packaged ``demo.yaml``, whose values are the demo's defaults) plus
    ``--set`` overrides."""
    from bloodray.defaults import packaged_config

    return load_config(DemoConfig, path if path and Path(path).exists() else packaged_config("demo.yaml"), overrides)


@dataclass
class DemoResult:
    run_uri: str
    checkpoint: str
    output_uri: str
    report: str
    test_accuracy: float | None
    table: str
    truth: dict[str, Any]


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run the whole demo and print what it did; returns where everything is."""
    from bloodray.data import synth as synth
    from bloodray.nightly.config import ClassifyConfig
    from bloodray.nightly_job import classify
    from bloodray.config import from_dict, validate_tree
    from bloodray.analysis.query import run_query, format_table
    from bloodray.analysis.report import write_report
    from bloodray.train.ray_trainer import TrainConfig, run_training

    work = Path(cfg.workdir).resolve()
    # The demo owns its folder: a rerun starts clean instead of resuming an old run.
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    date = cfg.date or dt.datetime.now(dt.timezone.utc).date().isoformat()

    data_root = cfg.data.root
    if data_root is None:
        data_root = str(work / "train-cells")
        counts = synth.write_labelled_dataset(data_root, cfg.data.per_class, size=cfg.data.size, seed=cfg.data.seed)
        print(f"[demo] {sum(counts.values())} synthetic labelled cells in {data_root}")
    samples = synth.default_samples(cfg.archive.samples, cfg.archive.cells_per_sample, seed=cfg.archive.seed)
    archive = work / "archive"
    synth.write_archive(str(archive / date), samples, layout=cfg.archive.layout, size=cfg.data.size,
                        seed=cfg.archive.seed)
    print(f"[demo] slide archive of {len(samples)} samples x {cfg.archive.cells_per_sample} cells in {archive / date}")

    t = cfg.train
    train_cfg = from_dict(TrainConfig, {
        "data": {"root": data_root},
        "model": {"name": t.model, "input_size": t.input_size, "kwargs": {"batch_norm": t.batch_norm}},
        "train": {f.name: getattr(t, f.name) for f in fields(Recipe)},
        "scaling": {"num_workers": t.num_workers},
        "run": {"name": "demo", "storage_path": str(work / "runs")},
    })
    validate_tree(train_cfg)
    trained = run_training(train_cfg)
    accuracy = (trained.test_metrics or {}).get("accuracy")
    print(f"[demo] trained {t.model}: best checkpoint {trained.best_checkpoint}"
          + (f", held-out test accuracy {accuracy:.3f}" if accuracy is not None else ""))

    from bloodray.evaluation.evaluate import calibrate_run

    calibration = calibrate_run(trained.run_uri, force=cfg.force_gate)
    if not calibration["gate"]["passed"]:
        print(f"[demo] the model misses the quality gate ({'; '.join(calibration['gate']['failures'])}): sealed and "
              "classified anyway because force_gate is set; do not use it")
    test = calibration["test"]
    print(f"[demo] calibrated on val: temperature {calibration['temperature']:.2f}, review threshold "
          f"{calibration['review_threshold']:.2f}; on test ECE {test['ece_before']:.3f} -> {test['ece_after']:.3f}, "
          f"{test['review']['flagged_share']:.1%} flagged catching {test['review']['errors_caught']:.0%} of errors")
    if "ood" in test:
        print(f"[demo] OOD reference fitted on train, threshold on val: {test['ood']['unidentified_share']:.1%} of "
              f"test cells unidentified, {test['ood']['unidentified_or_review_share']:.1%} unidentified or in review")

    output = str(work / "output")
    classify_cfg = from_dict(ClassifyConfig, {
        "input": {"uri": str(archive), "layout": cfg.archive.layout},
        "output": {"uri": output},
        "model": {"checkpoint": trained.run_uri, "quality_gate": not cfg.force_gate},
        "run": {"date": date},
        "inference": {"num_gpus": 0, "concurrency": 1, "decode_cpus": 0.5},
        "report": {"enabled": False},  # written below, once the differential is printed
    })
    validate_tree(classify_cfg)
    result = classify(classify_cfg)
    print(f"[demo] classified {result.n_inputs} images: {result.n_predictions} predictions, "
          f"{result.n_errors} errors, {result.n_review} for review")
    print(result.shift_warning() or f"[demo] domain-shift alarm: none ({result.n_unidentified} cell(s) unidentified, "
          f"no sample unlike the training data)")

    table = run_query(output, """
        SELECT sample_id, n_wbc, round(pct_neutrophil, 1) AS neut, round(pct_lymphocyte, 1) AS lymph,
               round(pct_monocyte, 1) AS mono, round(pct_eosinophil, 1) AS eos, round(pct_basophil, 1) AS baso,
               round(ig_per_100_wbc, 1) AS ig_100wbc, round(erythroblast_per_100_wbc, 1) AS erb_100wbc,
               platelet_count AS plt, n_review, array_to_string(flags, '; ') AS flags
        FROM differentials ORDER BY sample_id""")
    truth = {s.sample_id: s.profile for s in samples}
    table = table.append_column("truth", [[truth.get(sid, "?") for sid in table.column("sample_id").to_pylist()]])
    text = format_table(table, "table", max_rows=1000)
    print("\nPer-sample differential (% of white cells; ig and erythroblasts per 100 WBC); truth = the synthetic profile\n")
    print(text)
    report = write_report(output, run_date=date)
    print(f"\n[demo] Delta Lake tables (Parquet files + _delta_log/): {output}/{{predictions,differentials,errors,runs}}/")
    print(f"[demo] report: {report}")
    print(f'[demo] try: bloodray query "SELECT * FROM differentials WHERE any_flag" --output {output}')
    return DemoResult(run_uri=trained.run_uri, checkpoint=trained.best_checkpoint, output_uri=output, report=report,
                      test_accuracy=accuracy, table=text, truth=truth)
