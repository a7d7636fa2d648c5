"""End to end: synthetic cells on S3 (moto server), Ray Train with 2 workers, checkpoints on S3,
`bloodray evaluate` reading them back, and a resubmitted run resuming from its checkpoint."""

from __future__ import annotations

import json
import time

import pytest

from bloodray import cli, storage
from bloodray.checkpoint import load_checkpoint, read_metadata
from bloodray.classes import CLASS_NAMES
from bloodray.config import ConfigError
from bloodray.data.synth import write_labelled_dataset
from bloodray.train.ray_trainer import load_train_config, run_training

pytestmark = pytest.mark.slow


def _overrides(bucket, opts, **extra):
    values = {
        "data.root": f"{bucket}/cells",
        "model.name": "bloodnet",
        "model.input_size": 64,
        # Batch norm makes bloodnet converge in a handful of steps; the paper's plain net needs far more.
        "model.kwargs.batch_norm": "true",
        # The paper's dropout (0.25 after every block) makes 56 steps on 112 images a coin toss.
        "model.kwargs.dropout": 0.0,
        "train.epochs": 8,
        "train.batch_size": 8,
        "train.lr": 0.002,
        # The recipe the pack trainer proved, through the Ray loop: warm-up + cosine, weight average, precise BN.
        "train.warmup_epochs": 1,
        "train.schedule": "cosine",
        "train.ema_decay": 0.9,
        "train.precise_bn_batches": 2,
        "scaling.num_workers": 2,
        "run.name": "e2e",
        "run.storage_path": f"{bucket}/runs",
        "storage.endpoint_url": opts["endpoint_url"],
    } | extra
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory):
    s3_server = request.getfixturevalue("s3_server")
    request.getfixturevalue("ray_cluster")
    import s3fs

    bucket = "s3://e2e-train"
    opts = {"endpoint_url": s3_server}
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    fs.mkdir("e2e-train")
    write_labelled_dataset(f"{bucket}/cells", 20, size=64, seed=1, storage_options=opts)
    good = fs.cat_file("e2e-train/cells/neutrophil/SNE_000000.jpg")
    # Bad inputs among the training images: skipped and listed, never a crash, whichever split they land in.
    fs.pipe_file("e2e-train/cells/basophil/BA_empty.jpg", b"")
    fs.pipe_file("e2e-train/cells/eosinophil/EO_truncated.jpg", good[: len(good) // 3])
    fs.pipe_file("e2e-train/cells/monocyte/MO_corrupt.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 3)
    cfg = load_train_config("configs/train/bloodnet.yaml", _overrides(bucket, opts))
    started = time.perf_counter()
    result = run_training(cfg)
    return {"bucket": bucket, "opts": opts, "fs": fs, "cfg": cfg, "result": result,
            "seconds": time.perf_counter() - started}


def test_training_writes_checkpoints_to_s3(trained):
    result, fs = trained["result"], trained["fs"]
    assert result.best_checkpoint.startswith("s3://e2e-train/runs/e2e/checkpoint_epoch")
    for name in ("split.parquet", "config.yaml", "data_report.json", "summary.json"):
        assert fs.exists(f"e2e-train/runs/e2e/{name}"), name
    meta = read_metadata(result.best_checkpoint, trained["opts"])
    assert meta.classes == list(CLASS_NAMES) and meta.model_name == "bloodnet" and meta.input_size == 64
    assert {"val_accuracy", "val_macro_f1", "train_loss", "val_loss"} <= set(meta.metrics)
    saved = fs.cat_file("e2e-train/runs/e2e/config.yaml").decode()
    assert "endpoint_url" in saved and "bloodray-test-secret" not in saved
    loaded = load_checkpoint(result.best_checkpoint, trained["opts"])
    assert loaded.model.training is False
    # Synthetic cells are easy: eight short epochs must already beat chance (1/8) clearly.
    assert result.test_metrics["accuracy"] > 0.3, result.test_metrics


def test_bad_training_images_are_skipped_and_listed(trained):
    report = json.loads(trained["fs"].cat_file("e2e-train/runs/e2e/data_report.json"))
    dropped = {d["uri"].rsplit("/", 1)[-1]: d["reason"] for d in report["dropped"]}
    skipped = {d["uri"].rsplit("/", 1)[-1]: d["error"] for d in report["skipped_undecodable"]}
    assert dropped["BA_empty.jpg"].startswith("empty")
    assert skipped["EO_truncated.jpg"].startswith("truncated")
    assert skipped["MO_corrupt.jpg"].split(":")[0] in {"corrupt", "truncated", "not_image"}


def test_evaluate_cli_reads_checkpoint_back(trained, capsys):
    bucket, opts = trained["bucket"], trained["opts"]
    code = cli.run(["evaluate", "--run", f"{bucket}/runs/e2e", "--endpoint-url", opts["endpoint_url"],
                    "--output", f"{bucket}/eval-cli"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| Model | Type | Truth |" in out and "macro-F1" in out
    fs = trained["fs"]
    for name in ("metrics.json", "per_class.parquet", "predictions.parquet", "confusion_matrix.png", "table2.md",
                 "training_curves.png"):
        assert fs.exists(f"e2e-train/eval-cli/{name}"), name
    metrics = json.loads(fs.cat_file("e2e-train/eval-cli/metrics.json"))
    assert len(metrics["confusion_matrix"]) == 8 and metrics["n"] == sum(map(sum, metrics["confusion_matrix"]))


def test_the_ray_loop_runs_the_shared_recipe(trained):
    from bloodray.checkpoint import run_checkpoints
    from bloodray.data.labelled import read_parquet
    from bloodray.train.ray_loop import steps_per_epoch
    from bloodray.train.recipe import LRSchedule

    opts, fs = trained["opts"], trained["fs"]
    latest = read_metadata(run_checkpoints(f"{trained['bucket']}/runs/e2e", opts)[-1], opts)
    assert [h["epoch"] for h in latest.history] == list(range(1, 9))
    # Per-step warm-up + cosine over the steps each worker took (its equal share of the decodable images).
    manifest = read_parquet(f"{trained['bucket']}/runs/e2e/split.parquet", opts)
    skipped = {d["uri"] for d in json.loads(fs.cat_file("e2e-train/runs/e2e/data_report.json"))["skipped_undecodable"]}
    n_train = sum(1 for uri, split in zip(manifest.column("uri").to_pylist(), manifest.column("split").to_pylist())
                  if split == "train" and uri not in skipped)
    steps = steps_per_epoch(n_train, 2, 8)
    schedule = LRSchedule("cosine", 1, 8, steps)
    assert [h["lr"] for h in latest.history] == pytest.approx([0.002 * schedule(steps * e - 1) for e in range(1, 9)])
    # Raw and averaged weights were both scored; the checkpoint holds the better one and says which.
    for h in latest.history:
        assert h["weights"] in ("raw", "ema") and {"val_macro_f1_raw", "val_macro_f1_ema"} <= set(h)
        assert h["val_macro_f1"] == max(h["val_macro_f1_raw"], h["val_macro_f1_ema"])
    # train.precision=auto: bf16 where this CPU has it natively (and the self-check passes), else fp32.
    from bloodray.precision import resolve_precision

    expected = resolve_precision("auto", "cpu").name
    assert {h["precision"] for h in latest.history} == {expected}, latest.history[0]["precision_reason"]


def test_resubmitted_run_resumes_from_checkpoint(trained, capfd):
    first = read_metadata(trained["result"].best_checkpoint, trained["opts"])
    cfg = load_train_config("configs/train/bloodnet.yaml", _overrides(trained["bucket"], trained["opts"],
                                                                      **{"train.epochs": 9}))
    again = run_training(cfg)
    assert "resuming e2e from the checkpoint of epoch 8" in capfd.readouterr().out
    latest = read_metadata(storage.join(trained["bucket"], "runs/e2e/checkpoint_epoch0009"), trained["opts"])
    assert [h["epoch"] for h in latest.history] == list(range(1, 10))
    # Epochs 1-8 were not trained again: their records are the originals.
    assert latest.history[0] == next(h for h in [*first.history] if h["epoch"] == 1)
    assert again.best_checkpoint.startswith("s3://e2e-train/runs/e2e/checkpoint_epoch")


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"train\.epoch: unknown key \(did you mean 'train\.epochs'\?\)"):
        load_train_config("configs/train/bloodnet.yaml", ["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"scaling\.num_workers: expected an integer"):
        load_train_config("configs/train/bloodnet.yaml", ["scaling.num_workers=two"])
    with pytest.raises(ConfigError, match=r"model\.name: unknown model 'resnet9000'"):
        load_train_config("configs/train/bloodnet.yaml", ["model.name=resnet9000"])
    with pytest.raises(ConfigError, match=r"data(\.root)?: required"):
        load_train_config(None, [])


def test_cli_errors_are_one_line(tmp_path, s3_server, capsys):
    (tmp_path / "empty").mkdir()
    cases = [
        (["--set", "model.name=resnet9000"], "unknown model 'resnet9000'"),
        (["--set", f"data.root={tmp_path / 'empty'}"], "no images found"),
        (["--set", "data.root=s3://no-such-bucket/cells", "--set", f"storage.endpoint_url={s3_server}"],
         "s3://no-such-bucket/cells: data root not found"),
    ]
    for args, expected in cases:
        code = cli.run(["train", "--config", "configs/train/bloodnet.yaml", "--set", f"run.storage_path={tmp_path}/runs",
                        *args])
        err = capsys.readouterr().err.strip()
        assert code == 2 and expected in err and len(err.splitlines()) == 1, err


@pytest.fixture()
def auth_s3_server():
    """A second S3 server that checks credentials: the test's fake keys are unknown to it."""
    from helpers_s3 import moto_server

    with moto_server(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as endpoint:
        yield endpoint


def test_bad_credentials_give_one_clear_line(auth_s3_server, tmp_path, capsys):
    code = cli.run(["train", "--config", "configs/train/bloodnet.yaml", "--set", "data.root=s3://lab-bucket/cells",
                    "--set", f"storage.endpoint_url={auth_s3_server}", "--set", f"run.storage_path={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "s3://lab-bucket/cells: access denied -- check the AWS credentials" in err
    assert "bloodray-test-secret" not in err
