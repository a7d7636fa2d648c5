"""The nightly output contract (bloodray.nightly.contract) is the one source of every table's columns.

The DuckDB views of ``bloodray query``, the staged per-image rows, the SQL that
fills the tables and the committed files must all agree with it; each test
here fails when one of them drifts.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bloodray import storage
from bloodray.analysis import query
from bloodray.config import load_config
from bloodray.data import stages, synth
from bloodray.data.preset import EvalPreset
from bloodray.nightly import contract
from bloodray.nightly.commit import commit_run
from bloodray.nightly.config import ClassifyConfig
from bloodray.nightly.pipeline import stage_run, to_staged_rows
from bloodray.nightly.plan import plan_run
from bloodray.predict import CellPredictor

#: The only place Arrow types are spelled as DuckDB types: what DuckDB must map each contract type to.
DUCKDB_TYPE = {
    pa.string(): "VARCHAR",
    pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE",
    pa.int64(): "BIGINT",
    pa.bool_(): "BOOLEAN",
    pa.timestamp("us", tz="UTC"): "TIMESTAMP WITH TIME ZONE",
    pa.list_(pa.string()): "VARCHAR[]",
    pa.binary(): "BLOB",
    pa.date32(): "DATE",  # run_date where readers see it (stored as text)
}
DATE = "2024-05-01"


def _describe(con, view: str) -> list[tuple[str, str]]:
    return [(row[0], row[1]) for row in con.execute(f"DESCRIBE {view}").fetchall()]


def _assert_views_follow_the_contract(con) -> None:
    """Every view shows the contract's stored columns, then exactly the clearer alias names the dictionary adds."""
    from bloodray.nightly import dictionary

    for view in query.VIEWS:
        stored = contract.duckdb_columns(view)
        described = _describe(con, view)
        assert described[:len(stored)] == stored, view
        assert [name for name, _ in described[len(stored):]] == [new for new, _, _ in
                                                                  dictionary.ALIASES.get(view, [])], view


@pytest.mark.parametrize("view", query.VIEWS)
def test_duckdb_types_map_one_to_one_from_the_arrow_schema(view):
    schema = contract.view_schema(view)
    assert [name for name, _ in contract.duckdb_columns(view)] == schema.names
    assert contract.duckdb_columns(view) == [(f.name, DUCKDB_TYPE[f.type]) for f in schema]


def test_views_of_a_fresh_root_have_the_contract_columns(tmp_path):
    con = query.connect(str(tmp_path))
    try:
        _assert_views_follow_the_contract(con)
    finally:
        con.close()


def test_error_columns_and_staged_rows_derive_from_the_contract(tmp_path):
    assert tuple(contract.errors_schema().names[-3:]) == stages.ERROR_COLUMNS
    staged = contract.staged_schema()
    predictions = contract.predictions_schema()
    per_image = [n for n in predictions.names if n not in contract.RUN_LEVEL_PREDICTION_COLUMNS]
    thumbnail_only = [n for n in contract.thumbnails_schema().names if n not in predictions.names]
    assert staged.names == per_image + list(stages.ERROR_COLUMNS) + thumbnail_only
    for name in staged.names:
        source = (predictions if name in predictions.names else contract.thumbnails_schema()
                  if name in thumbnail_only else contract.errors_schema())
        assert staged.field(name).type == source.field(name).type, name
    for table in contract.TABLES:
        assert contract.select_list(table).split(", ") == contract.SCHEMAS[table]().names
    with pytest.raises(ValueError, match="no column"):
        contract.select_list("errors", {"not_a_column": "1"})

    # The real stage and predictor (no Ray): one good image and one broken file become staged rows.
    good, broken = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(np.full((40, 40, 3), 180, np.uint8)).save(good)
    broken.write_bytes(b"not an image")
    batch = {"uri": np.array([str(good), str(broken)], dtype=object),
             "sample_id": np.array(["S1", "S1"], dtype=object)}
    decoded = stages.read_decode_files(batch, preset=EvalPreset(64, (0.5,) * 3, (0.5,) * 3))
    assert set(stages.OUTPUT_COLUMNS) <= set(decoded)
    assert list(decoded["error_type"]) == ["", "not_image"] and decoded["error"][1].startswith("not_image: ")
    rows = to_staged_rows(CellPredictor(None, device="cpu")(decoded))
    assert rows.schema == staged
    assert rows.column("error_type").to_pylist() == [None, "not_image"]
    assert rows.column("predicted_class")[0].as_py() is not None and rows.column("confidence")[1].as_py() is None


@pytest.mark.slow
def test_a_real_run_stages_and_commits_the_contract_tables(tmp_path, ray_cluster):
    archive, out = str(tmp_path / "archive"), str(tmp_path / "out")
    synth.write_archive(storage.join(archive, DATE), synth.default_samples(2, 6, seed=3), size=64, seed=3)
    (tmp_path / "archive" / DATE / "S0001" / "broken.jpg").write_bytes(b"\xff\xd8 cut")
    cfg = load_config(ClassifyConfig, None, [f"input.uri={archive}", f"output.uri={out}", f"run.date={DATE}",
                                             "inference.batch_size=8"])
    plan = plan_run(cfg)
    stage_run(plan)
    staged = list((tmp_path / "out").glob(f"{contract.STAGING}/{plan.run_id}/results/*.parquet"))
    assert staged and all(pq.read_schema(f) == contract.staged_schema() for f in staged)
    result = commit_run(plan)
    assert result.n_predictions == 12 and result.n_errors == 1
    assert not (tmp_path / "out" / contract.STAGING / plan.run_id).exists()  # cleaned up after the commit

    fs, root = contract.output_root(out)
    for table in contract.TABLES:
        files = contract.parquet_files(fs, contract.partition_dir(root, table, DATE, plan.run_id))
        assert files, table
        assert all(pq.read_schema(f).remove_metadata() == contract.SCHEMAS[table]() for f in files), table
    manifest = contract.manifest_path(root, DATE, plan.run_id)
    assert pq.read_schema(manifest).remove_metadata() == contract.runs_schema()

    con = query.connect(out)
    try:
        _assert_views_follow_the_contract(con)
    finally:
        con.close()
