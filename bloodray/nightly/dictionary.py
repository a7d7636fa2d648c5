"""The data dictionary of the output tables: what every column of :mod:`bloodray.nightly.contract` holds.

The schemas (names and types) are the contract's; this module adds the unit and the meaning of each column. The
same text goes into the Delta tables' schemas as column comments (field metadata ``comment``, see
:func:`documented_schema`, used wherever :mod:`bloodray.nightly.tables` creates or commits a table) and into
``docs/tables.md`` (:func:`tables_markdown`, written by ``bloodray docs``). ``tests/test_docs.py`` fails when a
contract column has no entry here, so a new column is documented where it is declared.
"""

from __future__ import annotations

import re

import pyarrow as pa

from bloodray.classes import CLASS_NAMES
from bloodray.data.stages import THUMBNAIL_SIZE
from bloodray.nightly import contract

#: What each table holds, one row per ...
TABLES: dict[str, str] = {
    "predictions": "one row per classified image of the visible run of each date",
    "errors": "one row per input that could not be classified (every listed input is in exactly one of "
              "`predictions` and `errors`)",
    "differentials": "one row per sample: counts, percentages with their intervals, absolute counts, flags and the "
                     "domain-shift test",
    "thumbnails": "one small JPEG per classified image (join on `run_id, image_uri`)",
    "runs": "one row per committed run (the manifest; the `runs` view shows the visible run of each date, "
            "`all_runs` every committed run)",
    "reviews": "one row per reviewer's decision on a cell (written by `bloodray review import`); it applies to that "
               "image content and sample in every later run of the date",
    "signoffs": "one row per sign-off (or reopening) of a sample by a reviewer; the latest row of a sample counts",
    "verified_differentials": "one row per sample: `differentials` counted from the verified class of each reviewed "
                              "cell (the predicted class elsewhere), with who reviewed and signed off; a Delta table "
                              "committed by each review import and each run of the date, and a query view",
}

_PCT = "% of white cells"
_RATE = "per 100 white cells"

#: column -> (unit, meaning), for every table that has the column; ``(table, column)`` keys override.
COLUMNS: dict[str | tuple[str, str], tuple[str, str]] = {
    "run_date": ("date", "the night the run classified (UTC): a DATE in the query views, so `run_date + 1` and "
                         "`run_date >= '2026-11-01'` work; stored as `YYYY-MM-DD` text, the Delta partition value "
                         "(other Delta readers see the text)"),
    "run_id": ("", "the run that wrote the row: `<UTC start>-<random>` or `run.run_id`"),
    "sample_id": ("", "the sample (slide) the image belongs to, from its path (`input.sample_id_from`)"),
    "image_uri": ("URI", "the image file, or `<shard>#<member>` for a tar member; unique within a run"),
    "image_sha256": ("hex", "SHA-256 of the image's bytes"),
    "predicted_class": ("class name", "the model's class (one of the 8), also for unidentified cells"),
    "confidence": ("0-1", "the calibrated probability of the predicted class"),
    "needs_review": ("", "confidence under the run's review threshold (and the cell not unidentified): a person "
                         "should look"),
    "model_name": ("", "registry name of the model"),
    "checkpoint_id": ("", "`<model>-<weights hash>`: which weights classified"),
    "ood_score": ("", "out-of-distribution score (standardised log-Mahalanobis distances; higher = less like the "
                      "training cells); null without an OOD reference"),
    "status": ("", "`classified` (counted in the differential) or `unidentified` (above the OOD threshold, not "
                   "counted)"),
    ("runs", "status"): ("", "`committed` (the only status a manifest is written with)"),
    "stage": ("", "where the input failed: `list`, `read`, `decode` or `infer`"),
    "error_type": ("", "kind of failure (`empty`, `truncated`, `corrupt`, `not_image`, `too_large`, "
                       "`file_too_large`, `not_a_cell_image`, `unsupported_format`, ...)"),
    "message": ("", "the failure in words"),
    "jpeg": ("JPEG bytes", f"the decoded image the model's input is resized from, at most {THUMBNAIL_SIZE} px a "
                           "side (~6 kB; runs before issue 22: 80 px)"),
    "n_images": ("images", "inputs of the sample (classified + failed)"),
    "n_classified": ("images", "images of the sample with a prediction (unidentified ones included)"),
    "n_errors": ("images", "inputs of the sample that could not be classified"),
    ("runs", "n_errors"): ("inputs", "rows of the run in `errors`"),
    "n_review": ("images", "cells of the sample the run marked `needs_review`"),
    ("verified_differentials", "n_review"): ("images", "cells still to review: marked `needs_review` and not "
                                                       "reviewed yet (unlike `n_review` of `differentials`)"),
    ("runs", "n_review"): ("images", "cells of the run marked `needs_review`"),
    "n_wbc": ("cells", "white cells counted: neutrophils, lymphocytes, monocytes, eosinophils, basophils and "
                       "immature granulocytes (unidentified cells are not counted)"),
    "ig_per_100_wbc": (_RATE, "immature granulocytes per 100 white cells"),
    "erythroblast_per_100_wbc": (_RATE, "erythroblasts (nucleated red cells) per 100 white cells"),
    "platelet_count": ("images", "number of images classified as platelets (not a blood platelet count per litre)"),
    "wbc_count_10e9_per_l": ("10^9/L", "the sample's white cell count from `flags.sample_metadata`; null when not "
                                       "given"),
    "flag_basis": ("", "which ranges judged the sample: `absolute` (WBC count given) or `percent`"),
    "flags_confusion_corrected": ("", "the intervals and flags account for the model's own errors (its confusion "
                                      "on val, plus its training cells when they passed the check, sealed by "
                                      "`bloodray calibrate`): counts corrected for "
                                      "misclassification, intervals widened by the confusion's uncertainty; false: "
                                      "the checkpoint has no confusion matrix and the flags assume a perfect "
                                      "classifier; null: a run before this column"),
    "flag_erythroblasts": ("", "erythroblasts per 100 WBC: whole interval above `flags.erythroblast_per_100_wbc`"),
    "flag_ig": ("", "immature granulocytes per 100 WBC: whole interval above `flags.ig_percent`"),
    "flag_low_wbc_count": ("", "fewer than `flags.min_wbc` white cells were counted: the differential is unreliable"),
    "flags": ("list of text", "the sample's flags in words"),
    "any_flag": ("", "at least one flag is set"),
    "n_unidentified": ("cells", "cells above the OOD threshold (`status = 'unidentified'`), not counted"),
    "share_unidentified": ("0-1 (fraction, not %)", "n_unidentified / cells classified"),
    "unidentified_p_value": ("", "one-sided binomial test of the unidentified share against the checkpoint's "
                                 "validation share for the sample's class mix; null without an OOD reference"),
    "ood_ks": ("0-1", "Kolmogorov-Smirnov distance of the OOD scores from the validation distribution of "
                      "each cell's predicted class, scored in the arithmetic the run's actors used (`precision`; "
                      "the pooled one for a checkpoint fitted before the per-class reference)"),
    "ood_ks_p_value": ("", "one-sided KS test of the OOD scores against the validation distribution of each "
                           "cell's predicted class"),
    "domain_shift": ("", "under the domain-shift alarm: significant at `shift.alpha` and an effect of at least "
                         "`shift.min_effect`, each cell compared with its own predicted class's validation "
                         "reference; a sample under it keeps its flags, marked `flags_unverified`"),
    "flags_unverified": ("", "the sample is under the domain-shift alarm: its flags (other than the alarm's) were "
                             "counted from cells the model may not recognise and are kept unverified"),
    ("runs", "domain_shift"): ("", "the run is under the domain-shift alarm (its pooled cells or any sample)"),
    "n_verified": ("cells", "cells of the sample a reviewer verified"),
    "started_at": ("timestamp, UTC", "when the run started"),
    "committed_at": ("timestamp, UTC", "when the run's manifest was committed (the latest is the visible run)"),
    "checkpoint": ("URI", "the checkpoint that classified (null: the packaged default model)"),
    "review_threshold": ("0-1", "confidence under which `needs_review` was set"),
    "input_uri": ("URI", "the archive folder the run listed"),
    "output_uri": ("URI", "the output root the run wrote"),
    "config_yaml": ("YAML text", "the run's final config (secrets redacted)"),
    "flag_confusion_json": ("JSON, cells", "the checkpoint's confusion counts the run's flags were corrected "
                                           "with: val cells, plus training cells when they passed calibrate's "
                                           "check (8 x 8, rows true class, columns predicted, classes in the order "
                                           "of `bloodray classes`); null: flags not corrected (no matrix)"),
    "n_inputs": ("inputs", "inputs the run read itself (images, tar members, broken shards)"),
    "n_predictions": ("images", "rows of the run in `predictions` (carried-over rows included)"),
    "n_samples": ("samples", "rows of the run in `differentials`"),
    "timings_json": ("JSON, seconds", "seconds per stage: `list`, `read_decode_infer`, `write`, `aggregate`, "
                                      "`commit`"),
    "incremental_skipped_samples": ("samples", "samples an incremental run carried over without reading any image"),
    "carried_from_run_id": ("", "the run an incremental run carried rows over from; null otherwise"),
    "n_samples_shifted": ("samples", "samples under the domain-shift alarm"),
    ("runs", "precision"): ("", "the model actors' arithmetic (`fp32`, `bf16`; several actors' values joined by `,`); "
                                "null when the run classified nothing itself"),
    ("runs", "device"): ("", "where the model actors ran (`cpu`, `cuda:0`...; joined by `,`); null as `precision`"),
    "old_class": ("class name", "the class the run predicted"),
    "new_class": ("class name", "the verified class (equal to `old_class` when the reviewer confirmed it)"),
    "reviewer": ("", "who reviewed the cell"),
    "reviewed_at": ("timestamp, UTC", "when the cell was reviewed"),
    ("reviews", "run_id"): ("", "the run the reviewer saw"),
    ("reviews", "image_uri"): ("URI", "the file the reviewer saw (reviews apply by `sample_id` and `image_sha256`)"),
    "source": ("", "the file the row was imported from"),
    "review_status": ("", "`applied` (the latest review of an image of the date's visible run), `superseded` (a later "
                          "review of the same image applies) or `unmatched` (no image of the visible run has that "
                          "content any more); computed by the query view"),
    ("signoffs", "status"): ("", "`signed_off` or `reopened`"),
    ("signoffs", "run_id"): ("", "the run the reviewer signed off"),
    "signed_at": ("timestamp, UTC", "when the sample was signed off or reopened"),
    "verified_digest": ("hex", "fingerprint of the sample's verified cells (content and verified class of each) when "
                               "signed; null when signed on a run the date no longer shows"),
    "n_reviews_unmatched": ("reviews", "the sample's reviews that no longer match any of its images"),
    "reviewers": ("", "who reviewed the sample's cells"),
    "signoff_status": ("", "the sample's latest sign-off: `signed_off` or `reopened`; null when none"),
    "signed_off_by": ("", "who made the latest sign-off"),
    "signed_off_at": ("timestamp, UTC", "when the latest sign-off was made"),
    "signoff_outdated": ("", "the verified cells are no longer the ones signed off (a later run changed them)"),
}

_CLASS = "|".join(CLASS_NAMES)

#: Per-class and interval columns: (pattern, unit, meaning with ``{0}`` = the class or value named).
PATTERNS: list[tuple[str, str, str]] = [
    (rf"prob_({_CLASS})", "0-1", "the calibrated probability of class {0}"),
    (rf"count_({_CLASS})", "cells", "cells classified as {0} (unidentified cells are not counted)"),
    (rf"pct_({_CLASS})", _PCT, "{0}s as a percentage of white cells (immature granulocytes in the denominator)"),
    (r"(.+)_lo", "as the value", "lower bound of the 95 % interval (`flags.confidence`) of `{0}`: of the true rate, "
                                 "corrected for the model's confusion, where `flags_confusion_corrected`, else the "
                                 "Wilson interval of the counted cells"),
    (r"(.+)_hi", "as the value", "upper bound of the 95 % interval (`flags.confidence`) of `{0}`, as `{0}_lo`"),
    (rf"abs_({_CLASS})", "10^9/L", "absolute {0} count: WBC count x fraction; null without a WBC count"),
    (rf"flag_({_CLASS})_low", "", "{0}s below the reference range: the whole interval under the low limit"),
    (rf"flag_({_CLASS})_high", "", "{0}s above the reference range: the whole interval over the high limit"),
]


#: Clearer names the query views add beside a column whose stored name misleads (issue 24): view -> (new name,
#: SQL over the stored columns, the stored name it replaces). The stored (Delta) columns keep their names; the old
#: names stay in the views for one release beside the new ones, then only the new names remain.
ALIASES: dict[str, list[tuple[str, str, str]]] = {
    "differentials": [("n_platelet_images", "platelet_count", "platelet_count"),
                      ("n_flagged_for_review", "n_review", "n_review"),
                      ("pct_unidentified", "100.0 * share_unidentified", "share_unidentified")],
    "runs": [("n_flagged_for_review", "n_review", "n_review"),
             ("pct_unidentified", "100.0 * share_unidentified", "share_unidentified")],
    "verified_differentials": [("n_platelet_images", "platelet_count", "platelet_count"),
                               ("n_awaiting_review", "n_review", "n_review"),
                               ("pct_unidentified", "100.0 * share_unidentified", "share_unidentified")],
}
ALIASES["all_runs"] = ALIASES["runs"]

COLUMNS.update({
    "n_platelet_images": ("images", "images classified as platelets (a count of images, not platelets per litre); "
                                    "the clearer name of `platelet_count`"),
    "n_flagged_for_review": ("images", "cells the run marked `needs_review`; the clearer name of `n_review` in "
                                       "`differentials` and `runs`"),
    "n_awaiting_review": ("images", "cells marked `needs_review` that no reviewer has verified yet; the clearer "
                                    "name of `n_review` in `verified_differentials`"),
    "pct_unidentified": ("%", "unidentified cells as a percentage (0-100, like `pct_*`): 100 x `share_unidentified`"),
})

#: Stored names the aliases replace, and the note docs/tables.md gives them.
DEPRECATED_NOTE = ("the views also show it as `{new}`, the name to use: the old name leaves the views after one "
                   "release")


def alias_select(view: str) -> str:
    """``", expr AS new_name, ..."`` for a view's select list (empty when the view has no aliases)."""
    return "".join(f", {expr} AS {new}" for new, expr, _old in ALIASES.get(view, []))


def describe(table: str, column: str) -> tuple[str, str] | None:
    """(unit, meaning) of ``column`` in ``table``, or None when the dictionary lacks it."""
    for key in ((table, column), column):
        if key in COLUMNS:
            return COLUMNS[key]
    for pattern, unit, meaning in PATTERNS:
        m = re.fullmatch(pattern, column)
        if m:
            return unit, meaning.format(*m.groups())
    return None


def undocumented() -> list[str]:
    """``table.column`` of every contract column without an entry (the test lists them)."""
    return [f"{t}.{f.name}" for t in contract.SCHEMAS for f in contract.view_schema(t) if describe(t, f.name) is None]


def comment(table: str, column: str) -> str:
    """The column comment of the Delta schema: the meaning, and the unit in brackets."""
    unit, meaning = describe(table, column) or ("", "")
    return f"{meaning} [{unit}]" if unit else meaning


def documented_schema(table: str, schema: pa.Schema) -> pa.Schema:
    """``schema`` with each field's comment (field metadata ``comment``) from this dictionary."""
    return pa.schema([f.with_metadata({**(f.metadata or {}), b"comment": comment(table, f.name).encode()})
                      for f in schema], metadata=schema.metadata)


def tables_markdown(note: str) -> str:
    """docs/tables.md: every table and column with type, unit and meaning."""
    from bloodray.nightly.contract import duckdb_columns

    lines = [note, "# Output tables: the data dictionary", "",
             "Every table under a nightly run's `output.uri` and every column, with its type as DuckDB (and so "
             "`bloodray query`) shows it, its unit and its meaning. The same meanings are the column comments of the "
             "Delta tables' schemas. How the tables are laid out and committed: "
             "[the nightly guide](guides/nightly.md#output-tables); how to query them: "
             "[the analyst's guide](guides/analyst.md).", "",
             "Tables: " + ", ".join(f"[{t}](#{t})" for t in contract.SCHEMAS) + ".", ""]
    for table in contract.SCHEMAS:
        about = TABLES.get(table, "")
        lines += [f"## {table}", "", about[:1].upper() + about[1:] + ".", "", "| column | type | unit | meaning |",
                  "|---|---|---|---|"]
        renamed = {old: new for new, _expr, old in ALIASES.get(table, [])}
        for name, typ in duckdb_columns(table):
            unit, meaning = describe(table, name) or ("", "")
            if name in renamed:
                meaning += " (" + DEPRECATED_NOTE.format(new=renamed[name]) + ")"
            lines.append(f"| `{name}` | {typ} | {unit} | {meaning} |")
        for new, expr, _old in ALIASES.get(table, []):
            unit, meaning = describe(table, new) or ("", "")
            lines.append(f"| `{new}` | {'DOUBLE' if '100.0' in expr else 'BIGINT'} | {unit} | {meaning} (query "
                         "views only) |")
        lines.append("")
    return "\n".join(lines)
