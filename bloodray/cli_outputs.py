"""``bloodray`` subcommands over a classify job's output root: ``query``, ``vacuum``, ``upgrade-output``, ``review``."""

from __future__ import annotations

import argparse
import sys

from bloodray.cli_common import add_storage_arguments, run_date_argument, storage_options


def add_output_root_parsers(sub) -> None:
    """Register ``query``, ``vacuum`` and ``review`` on the main parser's subcommands."""
    add_query_parser(sub)
    add_vacuum_parser(sub)
    p = sub.add_parser("upgrade-output", help="commit an output root written before the Delta tables into them, "
                                              "in place (once per root)")
    p.add_argument("--output", required=True, help="output root of the classify job (local or s3://)")
    add_storage_arguments(p)
    p.set_defaults(func=cmd_upgrade_output)
    add_review_parser(sub)


def cmd_query(args) -> int:
    from bloodray.analysis.query import export

    table, text = export(args.output, args.sql, storage_options(args), fmt=args.format, out=args.out,
                         max_rows=None if args.all_rows else args.max_rows, as_of=args.as_of)
    if text is None:
        print(f"wrote {table.num_rows} row(s) to {args.out}", file=sys.stderr)
    else:
        text = text if text.endswith("\n") else text + "\n"
        # In pieces, so a reader that leaves early (`| head`) is noticed at once
        # (BrokenPipeError, handled in main) instead of after one huge write.
        for start in range(0, len(text), 1 << 16):
            sys.stdout.write(text[start:start + (1 << 16)])
            sys.stdout.flush()
    return 0


def cmd_review_export(args) -> int:
    from bloodray.review.roundtrip import export_review

    result = export_review(args.output, args.date, args.dest, storage_options(args))
    print(f"review page with all {result.n_cells} cell(s), {result.n_review} to review: {result.html_uri} "
          f"(open it in a browser; \"Download decisions\" writes the file `bloodray review import` takes); "
          f"the cells to review as CSV: {result.csv_uri}")
    return 0


def cmd_review_import(args) -> int:
    from bloodray.review.records import import_decisions

    result = import_decisions(args.output, args.date, args.file, args.reviewer, storage_options(args))
    if result.already_imported:
        print(f"{args.file} was imported before ({result.uri}); nothing new. verified_differentials of {args.date} "
              "refreshed")
        return 0
    signed = f" and {result.n_signoffs} sign-off(s)" if result.n_signoffs else ""
    print(f"imported {result.n_reviews} review(s){signed} for run {result.run_id} ({result.n_changed} class "
          f"change(s)) into {result.uri}; verified_differentials of {args.date} refreshed")
    for note in result.notes:
        print(f"  note: {note}")
    return 0


def cmd_review_refresh(args) -> int:
    from bloodray.review.records import refresh_dates

    for done in refresh_dates(args.output, args.date, storage_options(args)):
        unmatched = f", {done.n_reviews_unmatched} review(s) no longer match an image" if done.n_reviews_unmatched else ""
        print(f"{done.run_date}: {done.n_samples} sample(s), {done.n_verified} reviewed cell(s){unmatched}")
    return 0


def cmd_review_labels(args) -> int:
    from bloodray.review.roundtrip import export_labels

    counts = export_labels(args.output, args.dest, storage_options(args))
    print(f"wrote {counts['archive']} original image(s) and {counts['thumbnail']} thumbnail(s) (where the archive "
          f"was unreachable) to {args.dest}" + (f"; {counts['missing']} cell(s) without any image skipped"
                                                  if counts["missing"] else ""))
    return 0


def add_review_parser(sub) -> None:
    """``bloodray review export|import|refresh|labels``: the reviewer's round trip."""
    review = sub.add_parser("review", help="export cells to review, import verified classes, export labels")
    rsub = review.add_subparsers(dest="review_command", required=True)
    p = rsub.add_parser("export", help="write the interactive review page review.html (every cell of the date; "
                                          "no server needed) and review.csv (the cells to review)")
    p.add_argument("--output", required=True, help="output root of the classify job")
    p.add_argument("--date", required=True, type=run_date_argument, help="run date YYYY-MM-DD")
    p.add_argument("--dest", required=True, help="folder (or s3:// prefix) for review.html and review.csv")
    add_storage_arguments(p)
    p.set_defaults(func=cmd_review_export)
    p = rsub.add_parser("import", help="validate a decisions JSON (review page) or a filled review.csv and append it "
                                       "to the reviews and signoffs tables; refreshes verified_differentials")
    p.add_argument("file", help="decisions-<date>.json from the review page, or the filled review.csv")
    p.add_argument("--output", required=True, help="output root of the classify job")
    p.add_argument("--date", required=True, type=run_date_argument,
                   help="run date YYYY-MM-DD the review list was exported for")
    p.add_argument("--reviewer", default=None, help="review.csv only: reviewer name for rows whose reviewer column "
                                                     "is empty")
    add_storage_arguments(p)
    p.set_defaults(func=cmd_review_import)
    p = rsub.add_parser("refresh", help="commit the verified_differentials table for a date (default: every date); "
                                        "imports and runs do this themselves, this fills dates classified before "
                                        "the table existed")
    p.add_argument("--output", required=True, help="output root of the classify job")
    p.add_argument("--date", default=None, type=run_date_argument,
                   help="run date YYYY-MM-DD (default: every date with a committed run)")
    add_storage_arguments(p)
    p.set_defaults(func=cmd_review_refresh)
    p = rsub.add_parser("labels", help="export reviewed cells as a labelled <class>/<file> folder for training")
    p.add_argument("--output", required=True, help="output root of the classify job")
    p.add_argument("--dest", required=True, help="folder (or s3:// prefix) to write <class>/<file> images to")
    add_storage_arguments(p)
    p.set_defaults(func=cmd_review_labels)


def add_query_parser(sub) -> argparse.ArgumentParser:
    """``bloodray query SQL --output ROOT [--format ...] [--out FILE]``."""
    from bloodray.analysis.formats import DEFAULT_MAX_ROWS, EXPORT_FORMATS

    p = sub.add_parser("query", help="run read-only SQL (DuckDB) over the committed outputs; print or export it",
                       description="Run SQL over the views runs, all_runs, predictions, differentials, errors, "
                                   "thumbnails, reviews, signoffs and verified_differentials of an output root. Read-only: SQL cannot read or write files, load extensions "
                                   "or change settings.")
    p.add_argument("sql", help='e.g. "SELECT sample_id, pct_neutrophil FROM differentials WHERE any_flag"')
    p.add_argument("--output", required=True, help="output root of the classify job (local or s3://)")
    p.add_argument("--format", default="table", choices=list(EXPORT_FORMATS),
                   help="table (terminal, long paths cut from the left), csv, json, or parquet (needs --out)")
    p.add_argument("--out", metavar="FILE", default=None,
                   help="write the result to FILE (local path or s3://) instead of stdout; not inside the output's "
                        "table folders")
    p.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS, help="rows shown by --format table")
    p.add_argument("--all-rows", action="store_true", help="show every row with --format table")
    p.add_argument("--as-of", metavar="TIME", default=None,
                   help="query the tables as they were at TIME (ISO timestamp, UTC unless it names a zone, or a "
                        "date meaning its end), e.g. before a rerun replaced a date; reachable until `bloodray "
                        "vacuum` removes the files")
    add_storage_arguments(p)
    p.set_defaults(func=cmd_query)
    return p


def cmd_upgrade_output(args) -> int:
    from bloodray.nightly.legacy import upgrade_output

    counts = upgrade_output(args.output, storage_options(args))
    print(f"{args.output}: committed {counts['dates']} date(s), {counts['runs']} run manifest(s) and "
          f"{counts['reviews']} review file(s) into the Delta tables")
    return 0


def cmd_vacuum(args) -> int:
    from bloodray.nightly.pending import vacuum

    result = vacuum(args.output, storage_options(args), retain_hours=args.retain_hours, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for table, files in result.deleted.items():
        kept = result.kept.get(table, {})
        why = f"; kept {len(kept)} file(s): {'; '.join(sorted(set(kept.values())))}" if kept else ""
        print(f"{table}: {verb} {len(files)} file(s){why}")
    return 0


def add_vacuum_parser(sub) -> argparse.ArgumentParser:
    """``bloodray vacuum --output ROOT [--retain-hours H] [--dry-run]``."""
    from bloodray.nightly.tables import DEFAULT_RETAIN_HOURS

    p = sub.add_parser("vacuum", help="delete files of superseded and never-committed runs older than --retain-hours "
                                         "(never what a pending commit or a live run needs, nor reviews)",
                       description="Delete, in every Delta table of an output root, the files no version younger "
                                   "than --retain-hours needs: runs replaced by a rerun of their date, and runs that "
                                   "crashed before committing. Never deleted: files a pending commit or a live run "
                                   "still needs, and review files. `bloodray query --as-of` cannot go back further "
                                   "than the retention afterwards.")
    p.add_argument("--output", required=True, help="output root of the classify job (local or s3://)")
    p.add_argument("--retain-hours", type=int, default=DEFAULT_RETAIN_HOURS,
                   help=f"keep what versions of the last H hours need (default {DEFAULT_RETAIN_HOURS}, Delta's own)")
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    add_storage_arguments(p)
    p.set_defaults(func=cmd_vacuum)
    return p
