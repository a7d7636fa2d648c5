"""What a nightly run tells its scheduler: the run summary (``bloodray classify --json``) and the date's report.

After :func:`bloodray.nightly.commit.commit_run` the run is committed; what
follows reads it back and never fails it: :func:`add_details` (flagged samples,
bad inputs per type) and the report (:func:`bloodray.nightly_job.write_run_report`)
log a failure and name it in the :class:`~bloodray.nightly.plan.RunResult`.

:func:`run_summary` and :func:`failure_summary` build the one JSON object
``--json`` prints (:data:`SUMMARY_FORMAT`); its ``status`` and ``exit_code``
come from :mod:`bloodray.exit_codes`.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.compute as pc

from bloodray import exit_codes, storage
from bloodray.nightly import contract, tables
from bloodray.nightly.plan import RunResult

log = logging.getLogger(__name__)

#: ``format`` of the ``--json`` summary; bumped when a field changes meaning or goes.
SUMMARY_FORMAT = "bloodray-classify-summary/1"


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def add_details(result: RunResult, storage_options: Mapping[str, Any] | None = None) -> None:
    """Read the committed run's flagged samples and bad inputs per type into ``result`` (best effort)."""
    runs = pa.table({contract.RUN_DATE: [result.run_date], "run_id": [result.run_id]})
    try:
        diffs = tables.run_rows(result.output_uri, "differentials", runs, storage_options).to_table(
            columns=["sample_id", "flags", "any_flag"])
        flagged = diffs.filter(pc.fill_null(diffs.column("any_flag"), False)).sort_by("sample_id")
        result.flagged_samples = [{"sample_id": r["sample_id"], "flags": list(r["flags"] or [])}
                                  for r in flagged.select(["sample_id", "flags"]).to_pylist()]
        errors = tables.run_rows(result.output_uri, "errors", runs, storage_options).to_table(columns=["error_type"])
        counts = errors.group_by("error_type").aggregate([("error_type", "count")]).to_pylist()
        result.errors_by_type = {str(r["error_type"]): int(r["error_type_count"])
                                 for r in sorted(counts, key=lambda r: (-r["error_type_count"], str(r["error_type"])))}
    except Exception as exc:  # noqa: BLE001 - the run is committed; the summary goes without the details
        log.warning("run %s is committed, but its flagged samples and error types could not be read back (%s)",
                    result.run_id, _one_line(exc))


def table_uris(output_uri: str) -> dict[str, str]:
    """The URI of every table a committed run writes to (its rows are under ``run_date=<date>/<run_id>/``)."""
    return {table: storage.join(output_uri, table) for table in (*contract.TABLES, contract.RUNS)}


def run_summary(result: RunResult) -> dict[str, Any]:
    """The ``--json`` summary of a committed run (status ``committed`` or ``committed_with_alarm``)."""
    code = exit_codes.for_run(result)
    return {
        "format": SUMMARY_FORMAT, "status": exit_codes.STATUS[code], "exit_code": code, "error": None,
        "run_id": result.run_id, "run_date": result.run_date, "output_uri": result.output_uri,
        "checkpoint_id": result.checkpoint_id, "manifest_uri": result.manifest_uri,
        "tables": table_uris(result.output_uri),
        "counts": {"inputs": result.n_inputs, "predictions": result.n_predictions, "review": result.n_review,
                   "errors": result.n_errors, "samples": result.n_samples, "unidentified": result.n_unidentified,
                   "carried_over_samples": result.incremental_skipped_samples,
                   "resumed": getattr(result, "n_resumed", 0),
                   "flagged_samples": None if result.flagged_samples is None else len(result.flagged_samples)},
        "errors": {"total": result.n_errors, "by_type": result.errors_by_type},
        "alarm": {"domain_shift": result.domain_shift, "samples_shifted": result.n_samples_shifted,
                  "samples": result.n_samples, "unidentified_cells": result.n_unidentified},
        "flagged_samples": result.flagged_samples,
        "flags": {"confusion_corrected": not result.flags_uncorrected,
                  "note": result.flags_uncorrected},
        "report": {"uri": result.report_uri, "error": result.report_error},
        "timings_s": dict(result.timings),
    }


def failure_summary(exc: BaseException, code: int, run_date: str | None = None,
                    output_uri: str | None = None) -> dict[str, Any]:
    """The ``--json`` summary of a run that published nothing (refused, nothing to do, alarm, infrastructure)."""
    return {"format": SUMMARY_FORMAT, "status": exit_codes.STATUS.get(code, exit_codes.STATUS[exit_codes.REFUSED]),
            "exit_code": code, "error": str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__,
            "run_date": run_date, "output_uri": output_uri}
