"""A classified date to review: a real Ray classify of a small synthetic archive, and the CLI as a reviewer runs it."""

from __future__ import annotations

from pathlib import Path


def classify_synthetic(tmp_path: Path, date: str, seed: int, n_samples: int = 2, cells: int = 8):
    """``(output_uri, RunResult)`` of a date of ``n_samples`` synthetic samples, many cells to review.

    The packaged model without its OOD reference: fitted on PBC cells, that
    reference rightly calls these synthetic cells unidentified, and the tests
    using this are about reviewing low-confidence cells.
    """
    from bloodray import storage
    from bloodray.checkpoint import export_checkpoint
    from bloodray.config import load_config
    from bloodray.data import synth
    from bloodray.nightly.config import ClassifyConfig
    from bloodray.nightly.pipeline import run_classification

    archive, out = tmp_path / "archive", str(tmp_path / "out")
    synth.write_archive(storage.join(str(archive), date), synth.default_samples(n_samples, cells, seed=seed),
                        size=64, seed=seed)
    checkpoint = export_checkpoint("default", str(tmp_path / "no-ood"), ood={})
    cfg = load_config(ClassifyConfig, None, [f"input.uri={archive}", f"output.uri={out}", f"run.date={date}",
                                             f"model.checkpoint={checkpoint}", "inference.batch_size=8",
                                             "review.threshold=0.99"])
    return out, run_classification(cfg)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``bloodray ARGV`` in this process: ``(exit status, stdout, stderr)``."""
    from bloodray import cli

    rc = cli.run(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err
