"""The single-process pack trainer (bloodray.train.pack): pack, train, checkpoint, run folder."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from bloodray.checkpoint import load_checkpoint
from bloodray.classes import CLASS_NAMES
from bloodray.config import ConfigError, load_config
from bloodray.data.labelled import build_split
from bloodray.data.augment import augment_on_device
from bloodray.train.pack import PackedTrainConfig, PackError, build_pack, load_pack, train_packed
from bloodray.data.synth import write_labelled_dataset


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    root = tmp_path_factory.mktemp("cells")
    write_labelled_dataset(str(root), per_class=10, size=64, seed=3)
    path = tmp_path_factory.mktemp("pack") / "cells32.parquet"
    summary = build_pack(str(root), path, 32, workers=2)
    return root, path, summary


def test_pack_holds_the_training_split_resized(pack):
    root, path, summary = pack
    split, _ = build_split(str(root))
    table = pq.read_table(path)
    assert summary["rows"] == table.num_rows == split.num_rows
    # Same images in the same splits as `bloodray train` would use.
    expected = dict(zip(split.column("sha256").to_pylist(), split.column("split").to_pylist()))
    assert dict(zip(table.column("sha256").to_pylist(), table.column("split").to_pylist())) == expected
    loaded = load_pack(path, workers=2)
    assert loaded.input_size == 32
    assert loaded.images["train"].shape[1:] == (32, 32, 3) and loaded.images["train"].dtype == np.uint8
    assert sum(len(v) for v in loaded.labels.values()) == table.num_rows


def test_a_file_that_is_not_a_pack_is_refused(tmp_path):
    other = tmp_path / "other.parquet"
    pq.write_table(pq.read_table(__import__("io").BytesIO(_tiny_parquet())), other)
    with pytest.raises(PackError, match="not a bloodray pack"):
        load_pack(other)
    with pytest.raises(PackError, match="cannot read pack"):
        load_pack(tmp_path / "missing.parquet")


def _tiny_parquet() -> bytes:
    import io

    import pyarrow as pa

    buf = io.BytesIO()
    pq.write_table(pa.table({"x": [1]}), buf)
    return buf.getvalue()


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="^pack:"):
        load_config(PackedTrainConfig, overrides=[])
    with pytest.raises(ConfigError, match="^epochs:"):
        load_config(PackedTrainConfig, overrides=["pack=x.parquet", "epochs=0"])
    with pytest.raises(ConfigError, match="ema_decay"):
        load_config(PackedTrainConfig, overrides=["pack=x.parquet", "ema_decay=1.5"])


def test_augmentation_is_batched_bounded_and_seeded():
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    cfg = PackedTrainConfig(pack="x")
    a = augment_on_device(images, cfg.warp_augment(), torch.Generator().manual_seed(0))
    b = augment_on_device(images, cfg.warp_augment(), torch.Generator().manual_seed(0))
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    off = PackedTrainConfig(pack="x", rotate=False, flips=False, min_scale=1.0, max_scale=1.0, translate=0.0,
                            color_jitter=0.0, hue_jitter=0.0)
    same = augment_on_device(images, off.warp_augment(), torch.Generator().manual_seed(0))
    assert torch.allclose(same, images.permute(0, 3, 1, 2).float() / 255.0, atol=1e-5)


def test_training_writes_a_checkpoint_and_a_run_folder(pack, tmp_path):
    _, path, _ = pack
    cfg = PackedTrainConfig(pack=str(path), output=str(tmp_path / "run"), model="bloodnet",
                            model_kwargs={"batch_norm": True}, epochs=2, batch_size=16, warmup_epochs=1,
                            precise_bn_batches=2, device="cpu")
    result = train_packed(cfg)
    assert result["epochs_run"] == 2 and result["best_weights"] in ("raw", "ema")
    assert set(result["test"]["per_class"]) == set(CLASS_NAMES)
    loaded = load_checkpoint(str(tmp_path / "run" / "checkpoint"))
    assert loaded.metadata.classes == list(CLASS_NAMES) and loaded.metadata.input_size == 32
    assert loaded.metadata.config["trainer"] == "bloodray.train.pack"
    # The output folder is a run folder: its split is the pack's, for `bloodray calibrate --run`.
    split = pq.read_table(tmp_path / "run" / "split.parquet")
    assert split.num_rows == pq.read_table(path).num_rows
    assert json.loads((tmp_path / "run" / "result.json").read_text())["model"] == "bloodnet"

    # Fine-tuning starts from those weights; a different model is refused by field name.
    again = PackedTrainConfig(pack=str(path), output=str(tmp_path / "ft"), model="bloodnet",
                              model_kwargs={"batch_norm": True}, epochs=1, batch_size=16, warmup_epochs=0,
                              init_checkpoint=str(tmp_path / "run" / "checkpoint"), device="cpu")
    assert train_packed(again)["epochs_run"] == 1
    wrong = PackedTrainConfig(pack=str(path), output=str(tmp_path / "bad"), model="mobilenet_v2", epochs=1,
                              batch_size=16, init_checkpoint=str(tmp_path / "run" / "checkpoint"), device="cpu")
    with pytest.raises(ConfigError, match="^init_checkpoint:"):
        train_packed(wrong)


def test_pack_trainer_runs_the_shared_robustness_augmentation(pack, tmp_path):
    _, path, _ = pack
    robust = {"zoom_out": 1.5, "stain_jitter": 0.05, "blur_prob": 0.5, "noise_std": 4.0, "jpeg_prob": 0.5}
    cfg = PackedTrainConfig(pack=str(path), output=str(tmp_path / "robust"), model="bloodnet",
                            model_kwargs={"norm": "group"}, epochs=1, batch_size=16, warmup_epochs=0,
                            robust=robust, robust_workers=1, device="cpu")
    assert cfg.robust_augment().stain_jitter == 0.05
    assert train_packed(cfg)["epochs_run"] == 1
    with pytest.raises(ConfigError, match="^robust.sharpen: unknown key"):
        load_config(PackedTrainConfig, overrides=["pack=x.parquet", "robust.sharpen=1"])


def test_robust_batches_are_the_same_with_worker_processes():
    from bloodray.data.augment import AugmentConfig
    from bloodray.train.pack import RobustBatches

    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    cfg = AugmentConfig(zoom_out=1.5, stain_jitter=0.05, blur_prob=0.5, noise_std=4.0, jpeg_prob=0.5)
    order = np.random.default_rng(1).permutation(40)
    inline, pooled = RobustBatches(images, cfg, 0), RobustBatches(images, cfg, 2)
    try:
        a = list(inline.epoch(order, 8, 5, np.random.default_rng(2)))
        b = list(pooled.epoch(order, 8, 5, np.random.default_rng(2)))
    finally:
        pooled.close()
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert x.shape == (8, 32, 32, 3) and x.dtype == np.uint8
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], images[order[:8]])  # the augmentation did something


def test_pack_trainer_fits_a_stain_reference_and_fine_tunes_keep_it(pack, tmp_path):
    from bloodray.data.stain import fit_reference, reference_sample

    _, path, _ = pack
    cfg = PackedTrainConfig(pack=str(path), output=str(tmp_path / "stained"), model="bloodnet",
                            model_kwargs={"norm": "group"}, epochs=1, batch_size=16, warmup_epochs=0,
                            stain_norm="reinhard", device="cpu")
    train_packed(cfg)
    first = load_checkpoint(str(tmp_path / "stained" / "checkpoint")).metadata
    train = load_pack(str(path)).images["train"]
    assert first.preset().stain == fit_reference(train[reference_sample(len(train))])
    # A fine-tune keeps the colour space its starting weights were trained in.
    again = PackedTrainConfig(pack=str(path), output=str(tmp_path / "ft"), model="bloodnet",
                              model_kwargs={"norm": "group"}, epochs=1, batch_size=16, warmup_epochs=0,
                              stain_norm="reinhard", init_checkpoint=str(tmp_path / "stained" / "checkpoint"),
                              device="cpu")
    train_packed(again)
    assert load_checkpoint(str(tmp_path / "ft" / "checkpoint")).metadata.stain_norm == first.stain_norm
    with pytest.raises(ConfigError, match="^stain_norm: must be one of"):
        load_config(PackedTrainConfig, overrides=["pack=x.parquet", "stain_norm=macenko"])


def test_a_killed_pack_run_resumes_from_its_last_epoch_and_ends_as_an_uninterrupted_one(pack, tmp_path, capsys):
    """Same output folder = same run: a process killed mid-run continues from its last saved epoch."""
    import os
    import shutil
    import signal
    import subprocess
    import sys

    from bloodray import cli

    _, path, _ = pack
    settings = {"model": "bloodnet", "model_kwargs": json.dumps({"batch_norm": True}), "epochs": 5, "batch_size": 16,
                "warmup_epochs": 1, "precise_bn_batches": 2, "ema_decay": 0.9, "device": "cpu",
                "robust.noise_std": 4.0, "robust.jpeg_prob": 0.5}

    def argv(out, **extra):
        return ["-q", "train-packed", "--set", f"pack={path}", "--set", f"output={out}",
                *sum((["--set", f"{k}={v}"] for k, v in {**settings, **extra}.items()), [])]

    def result(out):
        return json.loads((out / "result.json").read_text())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed process: the same arithmetic, so the same numbers
    try:
        assert cli.run(argv(tmp_path / "straight")) == 0
        straight = result(tmp_path / "straight")
        out = tmp_path / "killed"
        proc = subprocess.Popen([sys.executable, "-m", "bloodray", *argv(out)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        for line in proc.stdout:
            if line.startswith("{") and json.loads(line).get("epoch") == 2:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=120)
        assert proc.returncode == -signal.SIGKILL and not (out / "checkpoint").exists()
        capsys.readouterr()
        assert cli.run(argv(out)) == 0
        started = json.loads(next(line for line in capsys.readouterr().out.splitlines() if "resumed_from" in line))
        resumed = result(out)
    finally:
        torch.set_num_threads(threads)
    assert 2 <= started["resumed_from_epoch"] < 5
    assert load_checkpoint(str(out / "last_epoch")).metadata.epoch == resumed["epochs_run"] == 5
    # Epochs before the kill were not trained again, and the data order, augmentation draws, optimizer, EMA and
    # best-so-far continued where they stopped: the run ends as the uninterrupted one did.
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4, 5]
    for a, b in zip(resumed["history"], straight["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4) and a["lr"] == pytest.approx(b["lr"])
        assert a["val_macro_f1"] == pytest.approx(b["val_macro_f1"], abs=1e-6)
    assert resumed["best_epoch"] == straight["best_epoch"]
    assert resumed["val"]["accuracy"] == pytest.approx(straight["val"]["accuracy"])

    # Another run in the same folder is refused by field name; without its resume state it starts over.
    cfg = load_config(PackedTrainConfig, "configs/train_packed.yaml",
                      [f"pack={path}", f"output={out}", "model_kwargs={\"batch_norm\": true}", "batch_size=8",
                       "device=cpu", "epochs=1", "warmup_epochs=0"])
    with pytest.raises(ConfigError, match="^output: .* holds the resume state of another run"):
        train_packed(cfg)
    shutil.rmtree(out / "last_epoch")
    fresh = train_packed(cfg)
    assert fresh["epochs_run"] == 1 and [h["epoch"] for h in fresh["history"]] == [1]
