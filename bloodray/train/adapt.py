"""Adapting a trained model to a new lab with the Ray Train job (issue 12).

Three settings of ``bloodray train`` make a fine-tune of an existing checkpoint:

- ``model.init_checkpoint``: a checkpoint or run dir (local or object storage) or ``default`` (the packaged model).
  :func:`with_init_checkpoint` takes the architecture (kwargs, input size) from its sealed metadata on the driver;
  :func:`load_init_weights` loads its weights in every worker through :func:`bloodray.checkpoint.load_checkpoint`,
  which checks the seal and the weights hash.
- ``train.freeze_backbone_epochs``: the first N epochs train the head only (:func:`backbone_parameters` are the
  ones :func:`bloodray.train.recipe.train_step` then leaves as they are).
- ``data.mix_original``: a share of the original training images (the training split of another root, split as
  it was for the original model) joins the lab's training split (:func:`mix_original`), against forgetting.

A lab's folder may hold any subset of the 8 classes: the head stays 8-way and metrics average over the classes
present (:func:`bloodray.evaluation.metrics.classification_metrics`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from typing import Any, Iterator, Mapping

import pyarrow as pa
import pyarrow.compute as pc
from torch import nn

from bloodray import storage
from bloodray.config import ConfigError
from bloodray.train.config import DataSection, TrainConfig


def with_init_checkpoint(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the architecture of ``model.init_checkpoint`` (unchanged when none is set).

    The checkpoint's sealed metadata is read (and its seal checked) here, so a wrong URI, a foreign or tampered
    checkpoint, or a different model name stops the run before any cluster work. ``model.kwargs`` and
    ``model.input_size`` must be left unset or equal the checkpoint's.
    """
    from bloodray.checkpoint import CheckpointError, read_metadata, resolve_checkpoint

    uri = cfg.model.init_checkpoint
    if not uri:
        return cfg
    opts = cfg.storage.storage_options()
    try:
        resolved = resolve_checkpoint(uri, opts)
        meta = read_metadata(resolved, opts)
    except (CheckpointError, OSError) as exc:
        raise ConfigError(f"model.init_checkpoint: {exc}") from None
    if meta.model_name != cfg.model.name:
        raise ConfigError(f"model.init_checkpoint: {uri} holds {meta.model_name!r}, not model.name={cfg.model.name!r}")
    kwargs = {k: v for k, v in meta.model_kwargs.items() if k != "input_size"}
    if cfg.model.kwargs and dict(cfg.model.kwargs) != kwargs:
        raise ConfigError(f"model.kwargs: {dict(cfg.model.kwargs)} differ from the kwargs of "
                          f"model.init_checkpoint ({kwargs}); leave model.kwargs unset")
    if cfg.model.input_size not in (None, meta.input_size):
        raise ConfigError(f"model.input_size: {cfg.model.input_size} differs from model.init_checkpoint's "
                          f"{meta.input_size}; leave it unset")
    if cfg.model.pretrained:
        raise ConfigError("model.pretrained: cannot be combined with model.init_checkpoint")
    trained_with = meta.stain_norm.get("method", "none") if meta.stain_norm else "none"
    if storage.protocol_of(uri) == "file" and os.path.exists(uri) and not os.path.isabs(uri):
        # The Ray Train workers run in another working directory: a relative folder would not be found there.
        uri = os.path.abspath(uri)
    model = dataclasses.replace(cfg.model, kwargs=kwargs, input_size=meta.input_size, init_checkpoint=uri,
                                stain_norm=cfg.model.stain_norm or trained_with)
    return dataclasses.replace(cfg, model=model)


def stain_reference(method: str | None, init_checkpoint: str | None, train_images,
                    storage_options: Mapping[str, Any] | None = None) -> "StainReference | None":
    """The stain reference of a run, for every trainer: None unless ``method`` is ``reinhard``; else the starting
    checkpoint's (its weights were trained in that colour space), else fitted on ``train_images()`` (uint8 NHWC)."""
    from bloodray.checkpoint import read_metadata, resolve_checkpoint
    from bloodray.data.stain import StainReference, fit_reference

    if method != "reinhard":
        return None
    if init_checkpoint:
        resolved = resolve_checkpoint(init_checkpoint, storage_options)
        inherited = StainReference.from_metadata(read_metadata(resolved, storage_options).stain_norm, resolved)
        if inherited is not None:
            return inherited
    return fit_reference(train_images())


def load_init_weights(model: nn.Module, cfg: TrainConfig) -> str:
    """Copy the weights of ``model.init_checkpoint`` into ``model`` (seal and hash checked); returns its URI."""
    from bloodray.checkpoint import load_checkpoint

    loaded = load_checkpoint(cfg.model.init_checkpoint, cfg.storage.storage_options())
    model.load_state_dict(loaded.model.state_dict(), strict=True)
    return loaded.uri


def backbone_parameters(model: nn.Module, model_name: str) -> list[nn.Parameter]:
    """The parameters outside the registry's head of ``model_name`` (``model`` may be wrapped by DDP)."""
    from bloodray.models import get_model_info

    net = getattr(model, "module", model)
    heads = get_model_info(model_name).head
    prefixes = tuple(f"{h}." for h in ((heads,) if isinstance(heads, str) else heads))
    return [p for name, p in net.named_parameters() if not name.startswith(prefixes)]


def set_backbone_norm_eval(model: nn.Module, model_name: str) -> None:
    """Put the backbone's BatchNorm layers in eval mode, so a frozen backbone keeps its running statistics too."""
    from bloodray.models import get_model_info

    net = getattr(model, "module", model)
    heads = get_model_info(model_name).head
    prefixes = tuple(f"{h}." for h in ((heads,) if isinstance(heads, str) else heads))
    for name, module in net.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not f"{name}.".startswith(prefixes):
            module.eval()


def mix_original(table: pa.Table, data: DataSection,
                 storage_options: Mapping[str, Any] | None = None) -> tuple[pa.Table, int]:
    """Add ``data.mix_original.share`` of the original root's training split to ``table``'s training split.

    The original root is split with ``data.mix_original.split`` (by default the split every bloodray run uses),
    so only images the original model trained on are mixed in and its val/test images stay unseen. The share is
    taken per class, chosen by a seeded hash of the contents (deterministic). Returns the table and the number of
    images added.
    """
    from bloodray.data.labelled import SplitFractions, build_split

    mix = data.mix_original
    if not mix.root or mix.share <= 0:
        return table, 0
    sp = mix.split
    original, _ = build_split(mix.root, SplitFractions(sp.train, sp.val, sp.test), sp.seed, storage_options)
    original = original.filter(pc.equal(original.column("split"), "train"))
    have = set(table.column("sha256").to_pylist())
    by_class: dict[str, list[int]] = {}
    for i, (name, digest) in enumerate(zip(original.column("class_name").to_pylist(),
                                           original.column("sha256").to_pylist())):
        if digest not in have:  # an image in both folders keeps the lab's split
            by_class.setdefault(name, []).append(i)
    picked: list[int] = []
    for name, idx in sorted(by_class.items()):
        idx.sort(key=lambda i: hashlib.sha256(f"{data.split.seed}:{original['sha256'][i]}".encode()).hexdigest())
        picked += idx[:int(round(len(idx) * mix.share))]
    added = original.take(pa.array(sorted(picked), pa.int64())).select(table.column_names).cast(table.schema)
    return pa.concat_tables([table, added]), len(picked)


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every BatchNorm of ``model`` normalises with the statistics of the batch it sees.

    Test-time batch statistics: a zero-effort adaptation to another lab's colours, provided the batches mix
    cells the way a slide does. The running statistics are left as they were (momentum 0 while in the block);
    the rest of the model (dropout) stays in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.momentum) for m in norms]
    try:
        for m in norms:
            m.train()
            m.momentum = 0.0
        yield model
    finally:
        for m, (training, momentum) in zip(norms, saved):
            m.train(training)
            m.momentum = momentum
