"""The nightly job as ``bloodray classify`` and ``jobs/classify.py`` run it: classify and commit, then the report.

:func:`classify` is the one library function the command calls:
:func:`bloodray.nightly.pipeline.run_classification` (plan, Ray stages,
commit; once committed and still under the date's lease, the date's reviews
applied to the new run: :func:`bloodray.review.records.refresh_after_commit`
commits ``verified_differentials``), then, with ``report.enabled``, the date's
report (:func:`bloodray.analysis.report.write_report`). It lives above the
three packages: the report reads the committed tables through
:mod:`bloodray.analysis`, and the reviews are :mod:`bloodray.review`'s, both of
which read :mod:`bloodray.nightly`, so the nightly package imports neither.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

from bloodray.analysis.report import write_report
from bloodray.nightly.config import ClassifyConfig
from bloodray.nightly.pipeline import run_classification
from bloodray.nightly.plan import RunResult
from bloodray.review.records import refresh_after_commit

log = logging.getLogger(__name__)


def classify(cfg: ClassifyConfig) -> RunResult:
    """Run the nightly classification of ``cfg`` and, with ``report.enabled``, write the date's report.

    The date's reviews are applied to the committed run (``verified_differentials``), then the report
    written. Raises what :func:`~bloodray.nightly.pipeline.run_classification` raises;
    once the run is committed nothing fails it (a report that cannot be
    written is logged and named in ``result.report_error``).
    """
    result = run_classification(cfg, after_commit=refresh_after_commit)
    if cfg.report.enabled:
        write_run_report(result, cfg.storage.storage_options())
    return result


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def write_run_report(result: RunResult, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write the date's report of a committed run into ``result`` (its URI, or why not, and its time)."""
    timer = time.monotonic()
    try:
        result.report_uri = write_report(result.output_uri, result.run_date, storage_options=storage_options)
    except Exception as exc:  # noqa: BLE001 - a report never fails a committed run
        result.report_error = _one_line(exc)
        log.warning("run %s (%s) is committed, but its report was not written: %s", result.run_id,
                    result.run_date, result.report_error)
    result.timings["report"] = round(time.monotonic() - timer, 3)
