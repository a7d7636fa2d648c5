"""Adaptation (issue 12): model.init_checkpoint, train.freeze_backbone_epochs and data.mix_original through the
real Ray Train job (2 workers, synthetic cells, a lab folder with a subset of the classes), bloodnet's norm option,
and test-time batch statistics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from bloodray import rundir, storage
from bloodray.checkpoint import CheckpointMetadata, load_checkpoint, run_checkpoints, write_checkpoint
from bloodray.classes import CLASS_NAMES
from bloodray.config import ConfigError
from bloodray.data.synth import write_labelled_dataset
from bloodray.models import create_model
from bloodray.models.bloodnet import HEAD
from bloodray.train.adapt import batch_statistics, mix_original, with_init_checkpoint
from bloodray.train.config import load_train_config
from bloodray.train.recipe import Recipe, start_training, train_step

SIZE = 48
SMALL = {"norm": "group", "filters": [8, 16, 16, 16, 24, 32, 32], "hidden": 32, "dropout": 0.0}
LAB_CLASSES = ("lymphocyte", "monocyte", "neutrophil")


def _write_start_checkpoint(directory: Path, seed: int = 0) -> tuple[str, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = create_model("bloodnet", len(CLASS_NAMES), input_size=SIZE, **SMALL)
    meta = CheckpointMetadata(model_name="bloodnet", classes=list(CLASS_NAMES), input_size=SIZE,
                              mean=[0.5] * 3, std=[0.5] * 3, model_kwargs=dict(SMALL, input_size=SIZE))
    write_checkpoint(directory, model, meta)
    return str(directory), {k: v.clone() for k, v in model.state_dict().items()}


def _lab_folder(root: Path, per_class: int, seed: int) -> Path:
    """A lab's labelled folder with only some of the 8 classes."""
    everything = root.parent / f"{root.name}-all"
    write_labelled_dataset(str(everything), per_class, size=SIZE, seed=seed)
    root.mkdir(parents=True)
    for name in LAB_CLASSES:
        (everything / name).rename(root / name)
    return root


# ---- fast: config, norm option, freezing, mixing, batch statistics ----

def test_group_norm_bloodnet_trains_a_step_and_round_trips_through_a_checkpoint(tmp_path):
    uri, _ = _write_start_checkpoint(tmp_path / "gn")
    loaded = load_checkpoint(uri)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in loaded.model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.model.modules())
    model = loaded.model.train()
    state = start_training(model, Recipe(epochs=1, lr=1e-2), steps_per_epoch=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, SIZE, SIZE)
    loss = train_step(state, x, torch.tensor([0, 1, 2, 3]), Recipe(epochs=1, lr=1e-2))
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    write_checkpoint(tmp_path / "after", model, loaded.metadata)
    again = load_checkpoint(str(tmp_path / "after")).model
    assert torch.allclose(again(x), model.eval()(x))


def test_norm_option_keeps_batch_norm_flag_working():
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in create_model("bloodnet", 8, batch_norm=True).modules())
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm))
                   for m in create_model("bloodnet", 8).modules())
    with pytest.raises(ValueError, match="norm"):
        create_model("bloodnet", 8, norm="layer")
    with pytest.raises(ValueError, match="contradicts"):
        create_model("bloodnet", 8, batch_norm=True, norm="group")


def test_frozen_parameters_keep_their_values_while_the_head_learns():
    torch.manual_seed(0)
    model = create_model("bloodnet", 8, input_size=SIZE, **SMALL)
    recipe = Recipe(epochs=1, lr=1e-2, optimizer="adamw", weight_decay=0.1)
    state = start_training(model, recipe, steps_per_epoch=3)
    head = set(f"{HEAD}.{n}" for n, _ in model.get_submodule(HEAD).named_parameters())
    frozen = [p for n, p in model.named_parameters() if n not in head]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        train_step(state, torch.randn(4, 3, SIZE, SIZE), torch.tensor([0, 1, 2, 3]), recipe, frozen=frozen)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in head), name


def test_init_checkpoint_sets_the_architecture_and_refuses_conflicts(tmp_path):
    uri, _ = _write_start_checkpoint(tmp_path / "start")
    cfg = load_train_config("configs/train/adapt.yaml", ["data.root=/tmp/x", f"model.init_checkpoint={uri}"])
    adopted = with_init_checkpoint(cfg)
    assert adopted.model.input_size == SIZE and adopted.model.kwargs == SMALL
    relative = os.path.relpath(uri)  # the Ray Train workers have another working directory
    assert with_init_checkpoint(load_train_config("configs/train/adapt.yaml", [
        "data.root=/tmp/x", f"model.init_checkpoint={relative}"])).model.init_checkpoint == os.path.abspath(relative)
    default = with_init_checkpoint(load_train_config("configs/train/adapt.yaml", ["data.root=/tmp/x"]))
    assert default.model.init_checkpoint == "default" and default.model.input_size == load_checkpoint(None).metadata.input_size
    with pytest.raises(ConfigError, match="model.kwargs"):
        with_init_checkpoint(load_train_config("configs/train/adapt.yaml", [
            "data.root=/tmp/x", f"model.init_checkpoint={uri}", "model.kwargs.dropout=0.5"]))
    with pytest.raises(ConfigError, match="model.init_checkpoint"):
        with_init_checkpoint(load_train_config("configs/train/adapt.yaml", [
            "data.root=/tmp/x", f"model.init_checkpoint={tmp_path / 'nowhere'}"]))
    # A hand-edited checkpoint is refused by its seal before any work starts.
    meta = json.loads((tmp_path / "start" / "bloodray.json").read_text())
    meta["input_size"] = 64
    (tmp_path / "start" / "bloodray.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="model.init_checkpoint"):
        with_init_checkpoint(cfg)


def test_mix_original_adds_a_share_of_the_original_training_split_only(tmp_path):
    original = tmp_path / "pbc"
    write_labelled_dataset(str(original), 10, size=SIZE, seed=3)
    lab = _lab_folder(tmp_path / "lab", 6, seed=4)
    cfg = load_train_config("configs/train/adapt.yaml", [
        f"data.root={lab}", f"data.mix_original.root={original}", "data.mix_original.share=0.5"])
    from bloodray.data.labelled import build_split

    lab_table, _ = build_split(str(lab), seed=0)
    mixed, added = mix_original(lab_table, cfg.data)
    again, _ = mix_original(lab_table, cfg.data)
    assert mixed.equals(again)  # deterministic
    orig, _ = build_split(str(original))  # the split the original model trained with
    orig_split = dict(zip(orig.column("uri").to_pylist(), orig.column("split").to_pylist()))
    new = mixed.slice(lab_table.num_rows)
    assert added == new.num_rows > 0
    assert set(new.column("split").to_pylist()) == {"train"}
    assert {orig_split[u] for u in new.column("uri").to_pylist()} == {"train"}  # never its val or test images
    per_class = {c: sum(1 for u, s in orig_split.items() if s == "train" and f"/{c}/" in u) for c in CLASS_NAMES}
    got = {c: new.column("class_name").to_pylist().count(c) for c in CLASS_NAMES}
    assert got == {c: int(round(n * 0.5)) for c, n in per_class.items()}
    with pytest.raises(ConfigError, match="data.mix_original.root"):
        load_train_config("configs/train/adapt.yaml", [f"data.root={lab}", "data.mix_original.share=0.5"])


def test_batch_statistics_use_the_batch_and_leave_running_statistics_alone():
    torch.manual_seed(0)
    model = create_model("bloodnet", 8, input_size=SIZE, batch_norm=True, dropout=0.5).eval()
    x = torch.randn(8, 3, SIZE, SIZE) * 3 + 1
    running = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    plain = model(x)
    with torch.no_grad(), batch_statistics(model):
        adapted = model(x)
        again = model(x)
    assert not torch.allclose(plain, adapted)
    assert torch.equal(adapted, again)  # dropout stays off
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in running.items())
    assert not model.training and torch.equal(model(x), plain)


# ---- slow: the real Ray Train job ----

@pytest.mark.slow
def test_adapt_through_ray_train_from_a_checkpoint_on_s3(tmp_path, s3_server, ray_cluster):
    import s3fs

    from bloodray.train.ray_trainer import run_training

    opts = {"endpoint_url": s3_server}
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    fs.mkdir("adapt-train")
    start_uri, start = _write_start_checkpoint(tmp_path / "start")
    fs.put(start_uri, "adapt-train/start", recursive=True)
    lab = _lab_folder(tmp_path / "lab", 12, seed=1)
    fs.put(str(lab), "adapt-train/lab", recursive=True)
    write_labelled_dataset("s3://adapt-train/pbc", 6, size=SIZE, seed=2, storage_options=opts)
    cfg = load_train_config("configs/train/adapt.yaml", [
        "data.root=s3://adapt-train/lab", "model.init_checkpoint=s3://adapt-train/start",
        "data.mix_original.root=s3://adapt-train/pbc", "data.mix_original.share=0.5",
        "data.split.train=0.75", "data.split.val=0.25", "train.epochs=2", "train.freeze_backbone_epochs=1",
        "train.batch_size=8", "train.lr=0.01", "train.schedule=constant", "scaling.num_workers=2",
        "run.name=adapt", "run.storage_path=s3://adapt-train/runs", "run.keep_checkpoints=2",
        f"storage.endpoint_url={s3_server}"])
    result = run_training(cfg)

    run = "s3://adapt-train/runs/adapt"
    report = storage.read_json(rundir.data_report(run), opts)
    assert report["mixed_original"] > 0
    with fs.open(rundir.split_manifest(run).removeprefix("s3://"), "rb") as fh:
        manifest = pq.read_table(fh)
    lab_rows = [c for u, c in zip(manifest.column("uri").to_pylist(), manifest.column("class_name").to_pylist())
                if "/lab/" in u]
    assert set(lab_rows) == set(LAB_CLASSES)
    checkpoints = run_checkpoints(run, opts)
    assert len(checkpoints) == 2
    first, second = (load_checkpoint(c, opts) for c in checkpoints)
    assert first.metadata.epoch == 1 and second.metadata.epoch == 2
    assert first.metadata.input_size == SIZE
    assert {k: v for k, v in first.metadata.model_kwargs.items() if k != "input_size"} == SMALL
    # Epoch 1 trained the head only: every backbone weight is the starting checkpoint's.
    for name, value in first.model.state_dict().items():
        assert torch.equal(value, start[name]) != name.startswith(HEAD), name
    # Epoch 2 trained everything.
    assert not torch.equal(second.model.state_dict()["features.0.weight"], start["features.0.weight"])
    # The head stays 8-way; the val metrics average over the classes the lab has.
    assert second.model.get_submodule(HEAD).out_features == len(CLASS_NAMES)
    assert np.isfinite(second.metadata.metrics["val_macro_f1"])
    assert result.best_checkpoint in checkpoints


@pytest.mark.slow
def test_adapt_through_ray_train_from_the_packaged_model(tmp_path, ray_cluster):
    from bloodray.train.ray_trainer import run_training

    packaged = load_checkpoint(None)
    lab = _lab_folder(tmp_path / "lab", 4, seed=5)
    cfg = load_train_config("configs/train/adapt.yaml", [
        f"data.root={lab}", "model.init_checkpoint=default", "train.epochs=1", "train.freeze_backbone_epochs=1",
        "train.batch_size=4", "scaling.num_workers=2", "run.name=from_default", f"run.storage_path={tmp_path}/runs",
        "data.split.train=0.5", "data.split.val=0.5"])
    result = run_training(cfg)
    tuned = load_checkpoint(result.best_checkpoint)
    assert tuned.metadata.input_size == packaged.metadata.input_size
    assert tuned.metadata.model_kwargs == packaged.metadata.model_kwargs
    # A frozen epoch: the backbone's weights and BatchNorm statistics are the packaged model's; the head moved.
    for name, value in tuned.model.state_dict().items():
        assert torch.equal(value, packaged.model.state_dict()[name]) != name.startswith(HEAD), name


@pytest.mark.slow
def test_stain_normalised_run_through_ray_train_and_an_adaptation_that_inherits_it(tmp_path, ray_cluster):
    """model.stain_norm=reinhard fits the reference on the training split and seals it into every checkpoint;
    a fine-tune from such a checkpoint keeps that reference (its weights' colour space), not its own lab's."""
    from bloodray.data.labelled import rows_of
    from bloodray.data.stain import fit_reference
    from bloodray.train.ray_trainer import _stain_sample, prepare_split, run_training

    start_uri, _ = _write_start_checkpoint(tmp_path / "start")
    home = tmp_path / "home"
    write_labelled_dataset(str(home), 6, size=SIZE, seed=3)
    common = ["train.epochs=1", "train.batch_size=8", "scaling.num_workers=2", "data.split.train=0.5",
              "data.split.val=0.25", "data.split.test=0.25", f"run.storage_path={tmp_path}/runs"]
    cfg = load_train_config("configs/train/adapt.yaml", [
        f"data.root={home}", f"model.init_checkpoint={start_uri}", "model.stain_norm=reinhard",
        "run.name=stained", "train.freeze_backbone_epochs=0", "train.evaluate_test=true", *common])
    result = run_training(cfg)
    stained = load_checkpoint(result.best_checkpoint).metadata
    assert stained.stain_norm["method"] == "reinhard"
    table, _ = prepare_split(f"{tmp_path}/runs/stained", cfg.data, {})
    assert stained.preset().stain == fit_reference(_stain_sample(rows_of(table, "train"), with_init_checkpoint(cfg)))
    # The run's test evaluation went through the same preset, read back from the checkpoint.
    assert 0.0 <= result.test_metrics["accuracy"] <= 1.0

    lab = _lab_folder(tmp_path / "lab", 6, seed=4)
    adapted = run_training(load_train_config("configs/train/adapt.yaml", [
        f"data.root={lab}", f"model.init_checkpoint={result.best_checkpoint}", "run.name=adapted",
        "train.freeze_backbone_epochs=0", *common]))
    assert load_checkpoint(adapted.best_checkpoint).metadata.stain_norm == stained.stain_norm
