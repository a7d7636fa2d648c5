"""The one training recipe: the Ray Train loop and the pack trainer get the same schedule and weight average from
the same config values, and a driver stopped while preparing a split can be resubmitted."""

from __future__ import annotations

import dataclasses
import math

import pyarrow.parquet as pq
import pytest
import torch

from bloodray.data.synth import write_labelled_dataset
from bloodray.train import ray_trainer
from bloodray.train.config import DataSection, OptimSection, load_train_config
from bloodray.train.pack import PackedTrainConfig, build_pack, train_packed
from bloodray.train.ray_loop import steps_per_epoch
from bloodray.train.recipe import Recipe, start_training, train_step

SHARED = {"epochs": 4, "lr": 0.01, "optimizer": "adamw", "weight_decay": 0.05, "momentum": 0.8,
          "schedule": "cosine", "warmup_epochs": 1, "label_smoothing": 0.1, "aux_loss_weight": 0.3,
          "ema_decay": 0.9, "precise_bn_batches": 2, "batch_size": 16, "precision": "fp32", "seed": 3}


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 8))


def test_every_recipe_key_has_the_same_name_in_both_trainers():
    assert {f.name for f in dataclasses.fields(Recipe)} == set(SHARED)
    ray_recipe = load_train_config(None, ["data.root=x"] + [f"train.{k}={v}" for k, v in SHARED.items()]).train.recipe()
    pack_recipe = PackedTrainConfig(pack="x", **SHARED).recipe()
    assert ray_recipe == pack_recipe == Recipe(**SHARED)


def test_ray_loop_and_pack_trainer_step_the_same_schedule_and_average():
    steps = 3
    recipes = {"ray": OptimSection(**SHARED).recipe(), "pack": PackedTrainConfig(pack="x", **SHARED).recipe()}
    ray_state = start_training(_tiny_model(), recipes["ray"], steps)
    pack_state = start_training(_tiny_model(), recipes["pack"], steps)
    gen = torch.Generator().manual_seed(1)
    lrs: dict[str, list[float]] = {"ray": [], "pack": []}
    for _ in range(SHARED["epochs"] * steps):
        images, labels = torch.randn(6, 3, 8, 8, generator=gen), torch.randint(0, 8, (6,), generator=gen)
        for name, state in (("ray", ray_state), ("pack", pack_state)):
            lrs[name].append(state.optimizer.param_groups[0]["lr"])
            train_step(state, images, labels, recipes[name])
            assert state.last_lr() == pytest.approx(lrs[name][-1])
    assert lrs["ray"] == lrs["pack"]
    # Linear warm-up over the first epoch's steps, then a cosine from the base rate towards zero.
    assert lrs["ray"][:steps] == pytest.approx([SHARED["lr"] * (s + 1) / steps for s in range(steps)])
    total = (SHARED["epochs"] - 1) * steps
    assert lrs["ray"][steps:] == pytest.approx(
        [SHARED["lr"] * 0.5 * (1 + math.cos(math.pi * s / total)) for s in range(total)])
    # The averages moved identically and lag the raw weights.
    for ema, other in zip(ray_state.ema.module.state_dict().values(), pack_state.ema.module.state_dict().values()):
        assert torch.equal(ema, other)
    raw = dict(ray_state.model.named_parameters())
    assert any(not torch.equal(p, raw[n]) for n, p in ray_state.ema.module.named_parameters())
    assert ray_state.ema.updates == pack_state.ema.updates == SHARED["epochs"] * steps


def test_ema_update_follows_the_warmed_up_decay():
    model = _tiny_model()
    state = start_training(model, Recipe(epochs=1, lr=0.1, ema_decay=0.5), 1)
    before = {k: v.clone() for k, v in state.ema.module.state_dict().items()}
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    train_step(state, images, labels, Recipe(epochs=1, lr=0.1, ema_decay=0.5))
    decay = min(0.5, 1 / 10)  # first update: (1 + 0) / (10 + 0)
    after = model.state_dict()
    for key, value in state.ema.module.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, decay * before[key] + (1 - decay) * after[key], atol=1e-6)
        else:
            assert torch.equal(value, after[key])


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    root = tmp_path_factory.mktemp("cells")
    write_labelled_dataset(str(root), per_class=8, size=32, seed=5)
    path = tmp_path_factory.mktemp("pack") / "cells24.parquet"
    build_pack(str(root), path, 24, workers=2)
    return path


def test_pack_trainer_runs_the_schedule_the_ray_config_describes(pack, tmp_path):
    values = {"epochs": 3, "lr": 0.004, "warmup_epochs": 1, "schedule": "cosine", "ema_decay": 0.9,
              "precise_bn_batches": 1, "batch_size": 8}
    result = train_packed(PackedTrainConfig(pack=str(pack), output=str(tmp_path / "run"), model="bloodnet",
                                            model_kwargs={"batch_norm": True}, device="cpu", **values))
    ray_cfg = load_train_config(None, ["data.root=x"] + [f"train.{k}={v}" for k, v in values.items()])
    n_train = pq.read_table(pack).column("split").to_pylist().count("train")
    steps = n_train // values["batch_size"]  # the pack trainer drops the last partial batch
    schedule = start_training(_tiny_model(), ray_cfg.train.recipe(), steps).schedule
    assert [h["lr"] for h in result["history"]] == pytest.approx(
        [values["lr"] * schedule(steps * epoch - 1) for epoch in (1, 2, 3)])
    assert all("val_macro_f1_ema" in h for h in result["history"])
    # Ray workers see their equal share of the rows, the last batch partial.
    assert steps_per_epoch(n_train, 2, 8) == math.ceil((n_train // 2) / 8)


def test_a_driver_stopped_between_report_and_manifest_can_be_resubmitted(tmp_path, monkeypatch):
    write_labelled_dataset(str(tmp_path / "cells"), per_class=4, size=32, seed=2)
    data = DataSection(root=str(tmp_path / "cells"))
    run = str(tmp_path / "run")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("driver stopped")

    monkeypatch.setattr(ray_trainer, "write_parquet", killed)
    with pytest.raises(KeyboardInterrupt):
        ray_trainer.prepare_split(run, data)
    # The report came first; no manifest means the split was never prepared.
    assert (tmp_path / "run" / "data_report.json").exists()
    assert not (tmp_path / "run" / "split.parquet").exists()
    monkeypatch.undo()
    table, dropped = ray_trainer.prepare_split(run, data)
    assert (tmp_path / "run" / "split.parquet").exists() and table.num_rows == 32 and dropped == []
    again, _ = ray_trainer.prepare_split(run, data)
    assert again.equals(table)


def test_renamed_mixed_precision_key_still_loads(tmp_path, caplog):
    """``train.mixed_precision`` (before ``train.precision``) still reads, with a warning naming the new key."""
    from bloodray.config import ConfigError, load_config
    from bloodray.train.config import TrainConfig

    base = {"data": {"root": str(tmp_path)}}
    with caplog.at_level("WARNING"):
        assert load_config(TrainConfig, base=base, overrides=["train.mixed_precision=false"]).train.precision == "fp32"
    assert "train.precision" in caplog.text
    assert load_config(TrainConfig, base=base, overrides=["train.mixed_precision=true"]).train.precision == "auto"
    with pytest.raises(ConfigError, match="train.mixed_precision: renamed to train.precision"):
        load_config(TrainConfig, base=base, overrides=["train.mixed_precision=true", "train.precision=bf16"])
