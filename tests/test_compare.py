"""The comparison job for real: two small models trained with Ray Train on one split of synthetic cells,
evaluated, tabulated; a rerun skips them; a model whose pretrained weights are missing is failed (or
trained from scratch) with the reason in the table. Nothing is mocked."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from bloodray import cli
from bloodray.classes import CLASS_NAMES
from bloodray.train.compare import load_compare_config, run_comparison, split_fingerprint
from bloodray.config import ConfigError
from bloodray.data.labelled import read_parquet
from bloodray.data.synth import write_labelled_dataset

SMALL_BLOODNET = {"batch_norm": True, "filters": [8, 8, 16, 16, 16, 16, 16], "hidden": 16}


def _overrides(root, out, models, on_pretrained_error="scratch"):
    return [f"data.root={root}", f"output.path={out}", f"output.on_pretrained_error={on_pretrained_error}",
            "train.epochs=1", "train.batch_size=16", "train.augment.enabled=false",
            "scaling.num_workers=1", "data.decode_batch_size=32", f"models={json.dumps(models)}"]


@pytest.fixture(scope="module")
def compared(request, tmp_path_factory):
    request.getfixturevalue("ray_cluster")
    tmp = tmp_path_factory.mktemp("compare")
    root, out = tmp / "cells", tmp / "out"
    write_labelled_dataset(str(root), 10, size=40, seed=3)
    models = [
        {"name": "bloodnet", "label": "tiny-bloodnet", "input_size": 32, "kwargs": SMALL_BLOODNET},
        # Weights that cannot be loaded + on_pretrained_error=scratch: trained from scratch, labelled so.
        {"name": "mobilenet_v2", "label": "tiny-mobilenet", "input_size": 32, "kwargs": {"width_mult": 0.25},
         "pretrained": True, "weights_uri": str(tmp / "no-such-weights.pth")},
    ]
    cfg = load_compare_config("configs/compare/cpu.yaml", _overrides(root, out, models))
    result = run_comparison(cfg)
    return {"root": root, "out": out, "models": models, "result": result, "tmp": tmp}


@pytest.mark.slow
def test_outputs_hold_table2_for_every_model(compared):
    out, result = compared["out"], compared["result"]
    assert {p.name for p in out.iterdir()} >= {"comparison.json", "comparison.parquet", "table2.md", "split.parquet",
                                                 "config.yaml", "runs"}
    payload = json.loads((out / "comparison.json").read_text())
    by_label = {m["label"]: m for m in payload["models"]}
    assert list(by_label) == ["tiny-bloodnet", "tiny-mobilenet"]
    for rec in by_label.values():
        assert rec["status"] == "ok" and rec["input_size"] == 32 and rec["epochs_trained"] == 1
        assert rec["test"]["n"] == sum(payload["split"]["class_counts"]["test"].values()) == 16
        assert set(rec["per_class"]) == set(CLASS_NAMES)
        assert rec["params"] > 0 and rec["train_seconds"] > 0 and rec["train_images_per_second"] > 0
        assert rec["eval_images_per_second"] > 0
    assert by_label["tiny-bloodnet"]["init"] == "scratch" and by_label["tiny-bloodnet"]["model"] == "bloodnet"
    # Never silently: the fallback to scratch is labelled and its reason kept.
    mobilenet = by_label["tiny-mobilenet"]
    assert mobilenet["init"] == "scratch (fallback)" and mobilenet["pretrained"] is False
    assert mobilenet["pretrained_requested"] is True and "no-such-weights.pth" in mobilenet["init_note"]
    hardware = payload["hardware"]
    assert hardware["ray_cpus"] == 2 and "CPU only" in hardware["summary"] and hardware["cpu_model"]

    table = (out / "table2.md").read_text()
    assert table == result.table
    assert "| Model | Type | Truth | Classified | Accuracy | Precision | Recall | F1 |" in table
    for label in by_label:
        assert sum(line.startswith(f"| {label} |") for line in table.splitlines()) == 8 + 1  # classes + summary
    assert "| tiny-mobilenet | mobilenet_v2 | scratch (fallback) | 32 px |" in table
    assert "trained from scratch instead" in table and hardware["summary"] in table

    rows = pq.read_table(out / "comparison.parquet").to_pylist()
    classes = [r for r in rows if r["row_type"] == "class"]
    summaries = {r["model"]: r for r in rows if r["row_type"] == "summary"}
    assert len(classes) == 2 * 8 and set(summaries) == set(by_label)
    for label, rec in by_label.items():
        assert summaries[label]["accuracy"] == pytest.approx(rec["test"]["accuracy"])
        assert summaries[label]["macro_f1"] == pytest.approx(rec["test"]["macro_f1"])
        assert summaries[label]["params"] == rec["params"]
        f1 = {r["class_name"]: r["f1"] for r in classes if r["model"] == label}
        assert f1 == pytest.approx({c: rec["per_class"][c]["f1"] for c in CLASS_NAMES})


@pytest.mark.slow
def test_every_model_used_the_identical_split(compared):
    out = compared["out"]
    payload = json.loads((out / "comparison.json").read_text())
    shared = read_parquet(str(out / "split.parquet"))
    assert split_fingerprint(shared) == payload["split"]["sha256"]
    per_run = {}
    for label in ("tiny-bloodnet", "tiny-mobilenet"):
        manifest = read_parquet(str(out / "runs" / label / "split.parquet"))
        per_run[label] = {s: sorted(h for h, sp in zip(manifest.column("sha256").to_pylist(),
                                                       manifest.column("split").to_pylist()) if sp == s)
                          for s in ("train", "val", "test")}
        assert split_fingerprint(manifest) == payload["split"]["sha256"]
        # ...and the test predictions are of exactly those test images.
        preds = pq.read_table(out / "runs" / label / "eval" / "test" / "predictions.parquet")
        assert sorted(preds.column("uri").to_pylist()) == sorted(
            u for u, s in zip(shared.column("uri").to_pylist(), shared.column("split").to_pylist()) if s == "test")
    assert per_run["tiny-bloodnet"] == per_run["tiny-mobilenet"]
    assert {m["split_sha256"] for m in payload["models"]} == {payload["split"]["sha256"]}


@pytest.mark.slow
def test_rerun_skips_finished_models_and_fails_missing_weights_in_the_table(compared, capsys):
    out, root = compared["out"], compared["root"]
    before = json.loads((out / "comparison.json").read_text())
    models = compared["models"] + [
        {"name": "resnet50", "label": "resnet50-imagenet", "input_size": 32, "pretrained": True,
         "freeze_backbone": True, "weights_uri": str(compared["tmp"] / "missing-resnet50.pth")}]
    code = cli.run(["compare", "--config", "configs/compare/cpu.yaml",
                    *[a for o in _overrides(root, out, models, "fail") for a in ("--set", o)]])
    captured = capsys.readouterr()
    assert code == 1
    assert "tiny-bloodnet already finished" in captured.out and "tiny-mobilenet already finished" in captured.out
    assert "compare: training" not in captured.out
    assert "resnet50-imagenet failed: pretrained weights cannot be loaded" in captured.err
    assert "missing-resnet50.pth" in captured.err
    after = json.loads((out / "comparison.json").read_text())
    assert [m["label"] for m in after["models"]] == ["tiny-bloodnet", "tiny-mobilenet", "resnet50-imagenet"]
    assert after["models"][:2] == before["models"]
    failed = after["models"][2]
    assert failed["status"] == "failed" and failed["init"] == "pretrained (unavailable)"
    assert not (out / "runs" / "resnet50-imagenet" / "split.parquet").exists()  # nothing trained
    table = (out / "table2.md").read_text()
    assert "| resnet50-imagenet | failed (see notes) |" in table
    assert "resnet50-imagenet: **failed**: pretrained weights cannot be loaded" in table
    rows = pq.read_table(out / "comparison.parquet").to_pylist()
    failed_rows = [r for r in rows if r["model"] == "resnet50-imagenet"]
    assert len(failed_rows) == 1 and failed_rows[0]["status"] == "failed" and failed_rows[0]["accuracy"] is None


@pytest.mark.slow
def test_output_of_other_data_is_refused(compared, tmp_path):
    other = tmp_path / "other-cells"
    write_labelled_dataset(str(other), 3, size=40, seed=4)
    cfg = load_compare_config("configs/compare/cpu.yaml",
                              _overrides(other, compared["out"], compared["models"]))
    with pytest.raises(ConfigError, match=r"output\.path: .* already holds a comparison split of other data"):
        run_comparison(cfg)


@pytest.mark.slow
def test_resuming_a_run_with_other_settings_is_refused(compared):
    models = [dict(compared["models"][0], input_size=48), compared["models"][1]]
    cfg = load_compare_config("configs/compare/cpu.yaml", _overrides(compared["root"], compared["out"], models))
    with pytest.raises(ConfigError, match=r"models\[0\]\.label: the run .*tiny-bloodnet was started with other settings"):
        run_comparison(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["models=[]"], r"^models: list at least one model"),
    (["models.1.epoch=2"], r"models\[1\]\.epoch: unknown key \(did you mean 'models\[1\]\.epochs'\?\)"),
    (["models.resnet50.epochs=0"], r"models\[2\]\.epochs: must be >= 1"),
    (["models.0.name=resnet9000"], r"models\[0\]\.name: unknown model 'resnet9000'"),
    (["models.1.label=bloodnet-bn"], r"models\[1\]\.label: 'bloodnet-bn' is already used by models\[0\]"),
    (["models.1.label=a|b"], r"models\[1\]\.label: 'a\|b' must be a name"),
    (["models.0.pretrained=true"], r"models\[0\]\.pretrained: bloodnet has no ImageNet weights"),
    (["models.1.freeze_backbone=true"], r"models\[1\]\.freeze_backbone: needs models\[1\]\.pretrained=true"),
    (["models.0.weights_uri=/w.pth"], r"models\[0\]\.weights_uri: set models\[0\]\.pretrained=true"),
    (["models.0.input_size=8"], r"models\[0\]\.input_size: must be >= 16"),
    (["models.0.overrides=[data.split.seed=1]"], r"models\[0\]\.overrides: 'data\.split\.seed=1' may not change 'data'"),
    (["models.0.overrides=[train.optimizer=lion]"], r"models\[0\] \(bloodnet-bn\): train\.optimizer: must be one of"),
    (["models.mobilenet_v2.kwargs=3"], r"models\[1\]\.kwargs: expected a mapping"),
    (["models.7.epochs=1"], r"models\.7: no such entry \(the config lists 4 models\)"),
    (["models.vgg16.epochs=1"], r"models\.vgg16: no entry labelled 'vgg16'"),
    (["output.on_pretrained_error=maybe"], r"output\.on_pretrained_error: must be one of 'fail', 'scratch'"),
    (["output.path="], r"output\.path: required"),
    (["train.epochs=0"], r"train\.epochs: must be >= 1"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_compare_config("configs/compare/cpu.yaml", overrides)


def test_shipped_configs_load():
    cpu = load_compare_config("configs/compare/cpu.yaml")
    assert [m.run_name for m in cpu.models] == ["bloodnet-bn", "mobilenet_v2", "resnet50", "resnet50-imagenet"]
    assert {m.input_size for m in cpu.models} == {96} and not cpu.scaling.use_gpu
    gpu = load_compare_config("configs/compare/gpu.yaml")
    from bloodray.models import list_models

    assert {m.name for m in gpu.models} == set(list_models()) and gpu.scaling.use_gpu
    assert all(m.input_size is None for m in gpu.models)  # native sizes
    assert all(m.pretrained for m in gpu.models if not m.name.startswith("bloodnet"))


def test_cli_config_error_is_one_line(capsys):
    code = cli.run(["compare", "--config", "configs/compare/cpu.yaml", "--set", "models.0.epochs=-1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "bloodray compare: error: models[0].epochs: must be >= 1"
