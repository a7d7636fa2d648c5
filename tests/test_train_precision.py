"""bf16 training on CPU: run-time detection, the self-check, the fp32 fallback, and real bf16 training steps
through the shared recipe (both trainers resolve ``precision`` with :mod:`bloodray.precision`)."""

from __future__ import annotations

import logging

import pytest
import torch

from bloodray import precision as prec
from bloodray.classes import NUM_CLASSES
from bloodray.config import ConfigError
from bloodray.data.synth import write_labelled_dataset
from bloodray.models import create_model
from bloodray.train.config import load_train_config
from bloodray.train.pack import PackedTrainConfig, build_pack, train_packed
from bloodray.train.recipe import Recipe, start_training, train_step


def test_fp32_is_fp32_everywhere():
    chosen = prec.resolve_precision("fp32", "cpu")
    assert chosen.name == "fp32" and not chosen.bf16
    with chosen.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_auto_follows_what_the_cpu_reports(monkeypatch):
    native, _ = prec.native_bf16("cpu")
    chosen = prec.resolve_precision("auto", "cpu")
    assert chosen.name == ("bf16" if native else "fp32"), chosen.reason
    # The same machine told it has no native bf16 (an older Xeon, an EPYC before Zen 4) trains in fp32.
    monkeypatch.setattr(prec, "cpu_bf16_flags", lambda: [])
    for requested in ("auto", "bf16"):
        fallback = prec.resolve_precision(requested, "cpu")
        assert fallback.name == "fp32" and "no native bf16" in fallback.reason


def test_a_failed_self_check_falls_back_to_fp32_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(prec, "native_bf16", lambda device_type: (True, "the CPU has avx512_bf16"))
    monkeypatch.setattr(prec, "self_check", lambda device_type: "bf16 logits differ from fp32 by 0.500")
    with caplog.at_level(logging.WARNING, logger="bloodray.precision"):
        chosen = prec.resolve_precision("bf16", "cpu")
    assert chosen.name == "fp32" and "differ from fp32" in chosen.reason
    assert "training in fp32" in caplog.text
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        prec.resolve_precision("fp16", "cpu")


def test_the_self_check_passes_for_real_bf16_on_cpu():
    # CPU autocast to bf16 runs on any x86 torch build (emulated without avx512_bf16/AMX): the check itself
    # must agree with fp32, whatever the speed.
    assert prec.self_check("cpu") is None


def test_bf16_training_steps_on_cpu_learn_and_keep_fp32_weights():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, 32, 32, generator=gen)
    labels = torch.arange(16) % NUM_CLASSES
    images += labels.view(-1, 1, 1, 1).float() * 0.3  # learnable: the class shifts the mean
    bf16 = prec.Precision("bf16", "cpu", "test")
    losses = {}
    for which, chosen in (("fp32", prec.Precision("fp32", "cpu", "test")), ("bf16", bf16)):
        torch.manual_seed(0)
        model = create_model("bloodnet", NUM_CLASSES, input_size=32, batch_norm=True, dropout=0.0)
        model = model.to(memory_format=torch.channels_last)
        recipe = Recipe(epochs=1, lr=3e-3, optimizer="adamw")
        state = start_training(model, recipe, 12)
        x = images.contiguous(memory_format=torch.channels_last)
        losses[which] = [float(train_step(state, x, labels, recipe, chosen.autocast())) for _ in range(12)]
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses["bf16"][-1] < 0.7 * losses["bf16"][0]
    # Same start, same data: bf16 rounding moves the first loss by well under a percent.
    assert losses["bf16"][0] == pytest.approx(losses["fp32"][0], rel=0.02)


def test_precision_is_a_config_key_of_both_trainers():
    assert load_train_config(None, ["data.root=x"]).train.precision == "auto"
    assert load_train_config(None, ["data.root=x", "train.precision=fp32"]).train.precision == "fp32"
    with pytest.raises(ConfigError, match=r"^train\.precision:"):
        load_train_config(None, ["data.root=x", "train.precision=fp16"])
    with pytest.raises(ConfigError, match="^precision:"):
        PackedTrainConfig(pack="x", precision="fp16").validate()


def test_pack_trainer_reports_the_precision_it_trained_in(tmp_path):
    root = tmp_path / "cells"
    write_labelled_dataset(str(root), per_class=6, size=32, seed=3)
    build_pack(str(root), tmp_path / "p.parquet", 24, workers=2)
    result = train_packed(PackedTrainConfig(pack=str(tmp_path / "p.parquet"), output=str(tmp_path / "run"),
                                            model="bloodnet", model_kwargs={"batch_norm": True}, epochs=1,
                                            batch_size=8, warmup_epochs=0, ema_decay=0.0, device="cpu"))
    assert result["precision"] == prec.resolve_precision("auto", "cpu").name
    assert result["precision_reason"]
