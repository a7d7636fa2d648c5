"""Single-process training from a pre-resized image pack, for a lone GPU box.

Ray Train (:mod:`bloodray.train.ray_trainer`) is the product's training path. This module
serves the case it cannot: one GPU machine without Ray (a borrowed benchmark
box, a workstation) and quick experiments. The deduplicated, stratified split
is decided exactly as ``bloodray train`` decides it, each image is resized once
with the evaluation preset and re-encoded into one Parquet "pack", and the whole
pack is held on the device as ``uint8``, so augmentation runs batched on the
GPU and the input pipeline never starves it. The result is an ordinary
bloodray checkpoint (safetensors + metadata) that ``evaluate``, ``calibrate``
and ``classify`` accept like any other.

Nothing here imports Ray: the pack and the trainer need only torch,
torchvision, pyarrow, Pillow and scikit-learn.
"""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from bloodray.classes import CLASS_NAMES, NUM_CLASSES
from bloodray.config import ConfigError
from bloodray.data.labelled import SplitFractions, build_split, read_many
from bloodray.data.augment import AugmentConfig, RobustConfig, WarpAugmentConfig, augment_on_device, robust_batch
from bloodray.data.preset import EvalPreset
from bloodray.data.stain import reference_sample
from bloodray.precision import resolve_precision
from bloodray.train.config import ModelInit
from bloodray.train.recipe import Recipe, builder_kwargs, precise_bn, start_training, train_step

PACK_FORMAT = "bloodray-pack-v1"
SPLITS = ("train", "val", "test")


class PackError(ValueError):
    """A pack is missing, malformed or does not match the requested model input."""


def build_pack(root: str, output: str | Path, input_size: int, *, image_format: str = "WEBP", quality: int = 90,
               fractions: SplitFractions = SplitFractions(), seed: int = 0,
               splits: Sequence[str] = SPLITS, storage_options: Mapping[str, Any] | None = None,
               workers: int = 8) -> dict[str, Any]:
    """Resize every image of ``root`` once and write a Parquet pack to ``output``.

    Columns: ``sha256``, ``uri``, ``class_name``, ``label``, ``split`` and
    ``image`` (``input_size`` square, resized with the evaluation preset so
    training sees what inference will see, then re-encoded). Lossy WebP at
    quality 90 is the default because it is about half the size of JPEG at the
    same fidelity (35.8 dB vs 34.8 dB PSNR for 4:2:0 JPEG, measured on PBC at
    128 px), which is what lets a 10k-image pack travel to a borrowed GPU box.
    Returns a summary.
    """
    table, dropped = build_split(root, fractions, seed, storage_options)
    keep = np.isin(np.asarray(table.column("split").to_pylist(), dtype=object), list(splits))
    table = table.filter(pa.array(keep))
    uris = table.column("uri").to_pylist()
    preset = EvalPreset(input_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

    def encode(data: bytes) -> bytes:
        out = io.BytesIO()
        options = {"method": 6} if image_format.upper() == "WEBP" else {"subsampling": 0}
        Image.fromarray(preset.load(data)).save(out, format=image_format, quality=quality, **options)
        return out.getvalue()

    encoded: list[bytes] = []
    for start in range(0, len(uris), 256):
        chunk = read_many(uris[start:start + 256], storage_options)
        for uri, data in zip(uris[start:start + 256], chunk):
            if isinstance(data, BaseException):
                raise PackError(f"{uri}: could not be read while packing ({data})")
        with ThreadPoolExecutor(workers) as pool:
            encoded.extend(pool.map(encode, chunk))
    pack = pa.table({
        "sha256": table.column("sha256"),
        "uri": table.column("uri"),
        "class_name": table.column("class_name"),
        "label": table.column("label"),
        "split": table.column("split"),
        "image": pa.array(encoded, pa.binary()),
    })
    meta = {"format": PACK_FORMAT, "input_size": input_size, "image_format": image_format,
            "quality": quality, "root": root,
            "seed": seed, "fractions": asdict(fractions), "classes": list(CLASS_NAMES),
            "dropped": len(dropped)}
    pack = pack.replace_schema_metadata({b"bloodray": json.dumps(meta).encode()})
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pack, str(output), compression="none")
    counts = {s: int(np.sum(np.asarray(table.column("split").to_pylist()) == s)) for s in splits}
    return {**meta, "rows": pack.num_rows, "split_counts": counts, "bytes": Path(output).stat().st_size}


@dataclass
class LoadedPack:
    """A pack decoded to ``uint8`` NHWC arrays per split."""

    input_size: int
    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    sha256: dict[str, list[str]]
    meta: dict[str, Any]


def write_split_manifest(pack_path: str | Path, output_dir: str | Path) -> Path:
    """Write the pack's split as ``<output_dir>/split.parquet``, as a Ray Train run does.

    With it, the output folder of :func:`train_packed` is a run folder for
    ``bloodray calibrate --run`` and ``bloodray evaluate --run`` on the original images.
    """
    from bloodray import rundir

    table = pq.read_table(str(pack_path), columns=["uri", "class_name", "label", "sha256", "split"])
    dest = Path(rundir.split_manifest(str(output_dir)))
    dest.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata(None), str(dest))
    return dest


def load_pack(path: str | Path, workers: int = 16) -> LoadedPack:
    """Read and decode a pack written by :func:`build_pack`."""
    try:
        table = pq.read_table(str(path))
    except (OSError, pa.ArrowInvalid) as exc:
        raise PackError(f"{path}: cannot read pack ({exc})") from exc
    raw = (table.schema.metadata or {}).get(b"bloodray")
    meta = json.loads(raw) if raw else {}
    if meta.get("format") != PACK_FORMAT:
        raise PackError(f"{path}: not a bloodray pack (format {meta.get('format')!r}, expected {PACK_FORMAT!r})")
    if meta.get("classes") != list(CLASS_NAMES):
        raise PackError(f"{path}: pack classes {meta.get('classes')} differ from the registry's {list(CLASS_NAMES)}")

    def decode(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)

    split_col = np.asarray(table.column("split").to_pylist(), dtype=object)
    images, labels, hashes = {}, {}, {}
    for split in SPLITS:
        idx = np.flatnonzero(split_col == split)
        if not len(idx):
            continue
        part = table.take(pa.array(idx))
        with ThreadPoolExecutor(workers) as pool:
            images[split] = np.stack(list(pool.map(decode, part.column("image").to_pylist())))
        labels[split] = np.asarray(part.column("label").to_pylist(), dtype=np.int64)
        hashes[split] = part.column("sha256").to_pylist()
    return LoadedPack(int(meta["input_size"]), images, labels, hashes, meta)


@dataclass
class PackedTrainConfig(Recipe, WarpAugmentConfig, ModelInit):
    """One single-process training run on a pack (see module docstring).

    The recipe keys (``epochs``, ``lr``, ``optimizer``...) are :class:`~bloodray.train.recipe.Recipe`'s and mean what
    ``train.*`` means for ``bloodray train``; the augmentation keys (``rotate``, ``flips``, ``min_scale``...) are
    :class:`~bloodray.data.augment.WarpAugmentConfig`'s; ``init_checkpoint`` and ``stain_norm`` are
    :class:`~bloodray.train.config.ModelInit`'s (as ``model.*`` of ``bloodray train``). The job's own defaults
    (AdamW, cosine, EMA...) are in
    ``configs/train_packed.yaml`` (packaged as the command's default config).
    """

    #: path of a pack written by ``bloodray pack`` (``jobs/pack.py``).
    pack: str = ""
    #: output folder: checkpoint, ``result.json``, ``config.yaml`` and the pack's ``split.parquet``.
    output: str = "runs/packed"
    #: registry name of the model (``bloodray models``).
    model: str = "bloodnet"
    #: the model builder's options (as ``model.kwargs`` of ``bloodray train``), e.g. ``batch_norm: true``.
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    #: the robustness augmentation, with the keys of ``train.augment`` of ``bloodray train``; the same
    #: :func:`bloodray.data.augment.robust_batch` runs on each batch's CPU copy before the on-device warp.
    robust: RobustConfig = field(default_factory=RobustConfig)
    #: worker processes that run the robustness augmentation of the next batches while the device trains on the
    #: current one (0 = in the training process, between steps). A GPU outruns one CPU core on it ~10x.
    robust_workers: int = 0
    #: evaluate on val every this many epochs.
    eval_every: int = 1
    #: stop starting new epochs after this many seconds of training (0 = no limit);
    #: the schedule is shortened to fit once the epoch time is known.
    time_budget_s: float = 0.0
    #: ``auto`` (the GPU if there is one), ``cpu``, ``cuda``, ``cuda:<n>`` or ``mps``.
    device: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.robust, Mapping):  # a library caller's plain dict, as before the section existed
            unknown = sorted(set(self.robust) - set(ROBUST_KEYS))
            if unknown:
                raise ConfigError(f"robust: unknown key(s) {', '.join(unknown)}; "
                                  f"expected some of {', '.join(ROBUST_KEYS)}")
            self.robust = RobustConfig(**self.robust)

    def validate(self, prefix: str = "") -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        if not self.pack:
            raise ConfigError("pack: path of a pack written by `python jobs/pack.py` is required")
        Recipe.validate(self, prefix)
        WarpAugmentConfig.validate(self, prefix)
        if self.eval_every < 1:
            raise ConfigError(f"eval_every: must be >= 1 (got {self.eval_every})")
        if self.robust_workers < 0:
            raise ConfigError(f"robust_workers: must be >= 0 (got {self.robust_workers})")
        ModelInit.validate(self, prefix)

    def robust_augment(self) -> AugmentConfig | None:
        """The robustness augmentation of this run (None when ``robust`` switches nothing on)."""
        cfg = AugmentConfig(**{name: getattr(self.robust, name) for name in ROBUST_KEYS})
        return cfg if cfg.robust else None

    def recipe(self) -> Recipe:
        """The training recipe of this run (the same one ``bloodray train`` builds from its ``train`` section)."""
        return Recipe(**{f.name: getattr(self, f.name) for f in fields(Recipe)})

    def warp_augment(self) -> WarpAugmentConfig:
        """The on-device augmentation of this run."""
        return WarpAugmentConfig(**{f.name: getattr(self, f.name) for f in fields(WarpAugmentConfig)})


#: The robustness keys of ``robust`` (the same names as under ``train.augment``).
ROBUST_KEYS = tuple(f.name for f in fields(RobustConfig))


_ROBUST_IMAGES: np.ndarray | None = None  # the training images, inherited by forked augmentation workers


def _robust_job(indices: np.ndarray, seed: int, cfg: AugmentConfig) -> np.ndarray:
    return robust_batch(_ROBUST_IMAGES[indices], np.random.default_rng(seed), cfg)


class RobustBatches:
    """The robustness augmentation of each batch of an epoch, computed ahead in worker processes.

    Each batch draws from its own generator seeded from ``rng``, so a batch's transforms are the same whatever
    ``workers`` is. With ``workers`` > 0 the pool is forked before any device work (the workers only run NumPy), and
    up to ``2 * workers`` batches are in flight while the device trains.
    """

    def __init__(self, images: np.ndarray, cfg: AugmentConfig, workers: int):
        global _ROBUST_IMAGES
        _ROBUST_IMAGES = images
        self.cfg = cfg
        self.pool = None
        if workers:
            import multiprocessing

            self.pool = multiprocessing.get_context("fork").Pool(workers)

    def epoch(self, order: np.ndarray, batch_size: int, steps: int, rng: np.random.Generator):
        """Yield the augmented uint8 NHWC batch of each of ``steps`` batches of ``order``."""
        seeds = rng.integers(0, 2**63, steps)
        jobs = [(order[b * batch_size:(b + 1) * batch_size], int(seeds[b]), self.cfg) for b in range(steps)]
        if self.pool is None:
            for job in jobs:
                yield _robust_job(*job)
            return
        depth = 2 * self.pool._processes
        pending = [self.pool.apply_async(_robust_job, job) for job in jobs[:depth]]
        for b in range(steps):
            batch = pending[b].get()
            if b + depth < steps:
                pending.append(self.pool.apply_async(_robust_job, jobs[b + depth]))
            pending[b] = None
            yield batch

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()


def _device(name: str):
    import torch

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _predict(net, images, preset: EvalPreset, amp, batch: int = 512) -> tuple[np.ndarray, float]:
    """Logits of ``net`` over a uint8 NHWC tensor held on the device, and the images per second."""
    import torch

    net.eval()
    outs = []
    _sync(images.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            with amp:
                outs.append(net(preset.normalize(images[start:start + batch], channels_last=True)).float())
    logits = torch.cat(outs)
    _sync(images.device)
    return logits.cpu().numpy(), len(logits) / (time.perf_counter() - t0)


def _clean_batches(images, preset: EvalPreset, batch_size: int, count: int, generator):
    """``count`` random un-augmented, normalized batches of the training images (for precise BN)."""
    import torch

    picks = torch.randperm(len(images), device=images.device, generator=generator)
    for b in range(min(count, len(images) // batch_size)):
        idx = picks[b * batch_size:(b + 1) * batch_size]
        yield preset.normalize(images[idx], channels_last=True)


def _load_model(cfg: PackedTrainConfig, size: int, kwargs: dict[str, Any], device):
    import torch

    from bloodray.checkpoint import load_checkpoint
    from bloodray.models import create_model

    model = create_model(cfg.model, NUM_CLASSES, pretrained=False, **kwargs)
    if cfg.init_checkpoint:
        start = load_checkpoint(cfg.init_checkpoint, device="cpu")
        if start.metadata.model_name != cfg.model or start.metadata.input_size != size:
            raise ConfigError(f"init_checkpoint: {cfg.init_checkpoint} holds {start.metadata.model_name} at "
                              f"{start.metadata.input_size} px, not {cfg.model} at {size} px")
        model.load_state_dict(start.model.state_dict())
    # channels_last is faster on CPUs too (oneDNN): bloodnet 128 px steps ran 1.5x (fp32) and 2.7x (bf16) faster.
    return model.to(device, memory_format=torch.channels_last)


def train_packed(cfg: PackedTrainConfig) -> dict[str, Any]:
    """Train ``cfg.model`` on a pack; write a bloodray checkpoint and ``result.json`` to ``cfg.output``.

    The optimizer, schedule, loss, weight average and precise BN are the shared recipe
    (:mod:`bloodray.train.recipe`). Model selection uses the val split only (best val macro-F1 of the raw or
    averaged weights over the evaluations); the test split, when the pack has one, is scored once at the end with
    the selected weights. A run with the same ``output`` continues exactly from its last epoch (``output/last_epoch``).
    """
    import torch

    from bloodray.evaluation.metrics import classification_metrics
    from bloodray.models import count_parameters, get_model_info
    from bloodray.train.resume_state import restore_pack_run, save_pack_run

    cfg.validate()
    info = get_model_info(cfg.model)  # unknown names fail before any data is read
    torch.manual_seed(cfg.seed)

    t_load = time.perf_counter()
    pack = load_pack(cfg.pack)
    for needed in ("train", "val"):
        if needed not in pack.images:
            raise PackError(f"{cfg.pack}: the pack has no {needed!r} images")
    robust = cfg.robust_augment()
    # Forked before the device is touched: a CUDA context does not survive a fork.
    robust_batches = RobustBatches(pack.images["train"], robust, cfg.robust_workers) if robust else None
    device = _device(cfg.device)
    on_gpu = device.type == "cuda"
    store = {s: torch.from_numpy(a).to(device) for s, a in pack.images.items()}
    targets = {s: torch.from_numpy(a).to(device) for s, a in pack.labels.items()}
    load_s = time.perf_counter() - t_load
    size = pack.input_size
    # Evaluation uses the inference preset itself; training standardizes its augmented floats with it too.
    from bloodray.train.adapt import stain_reference

    train = pack.images["train"]
    reference = stain_reference(cfg.stain_norm, cfg.init_checkpoint, lambda: train[reference_sample(len(train))])
    preset = EvalPreset(size, info.mean, info.std, stain=reference)
    precision = resolve_precision(cfg.precision, device.type)
    print(json.dumps({"model": cfg.model, **precision.to_dict()}), flush=True)
    amp = precision.autocast()

    kwargs = builder_kwargs(cfg.model, cfg.model_kwargs, size)
    model = _load_model(cfg, size, kwargs, device)
    n_train = len(pack.labels["train"])
    steps_per_epoch = n_train // cfg.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"batch_size: {cfg.batch_size} is larger than the {n_train} training images")
    recipe, augment = cfg.recipe(), cfg.warp_augment()
    state = start_training(model, recipe, steps_per_epoch)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    robust_rng = np.random.default_rng(cfg.seed)

    key = json.dumps({"pack": pack.meta, "model": cfg.model, "kwargs": kwargs, "batch_size": cfg.batch_size,
                      "seed": cfg.seed}, sort_keys=True, default=str)
    progress, best_state = restore_pack_run(cfg.output, key, state, generator, robust_rng,
                                            cfg.epochs)
    if progress["epoch"]:
        print(json.dumps({"model": cfg.model, "resumed_from_epoch": progress["epoch"], "output": cfg.output}),
              flush=True)
    history, best, epoch, trained_images, steady_time, train_time, stopped_early = (progress[k] for k in (
        "history", "best", "epoch", "trained_images", "steady_time", "train_time", "stopped_early"))
    while epoch < state.schedule.epochs:
        model.train()
        _sync(device)
        t0 = time.perf_counter()
        order = torch.randperm(n_train, device=device, generator=generator)
        robust_iter = None if robust_batches is None else \
            robust_batches.epoch(order.cpu().numpy(), cfg.batch_size, steps_per_epoch, robust_rng)
        loss_sum = torch.zeros((), device=device)
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            if robust_iter is None:
                batch = store["train"][idx]
            else:
                batch = torch.from_numpy(next(robust_iter)).to(device, non_blocking=True)
            x = augment_on_device(batch, augment, generator)
            x = preset.standardize(x).contiguous(memory_format=torch.channels_last)
            loss_sum += train_step(state, x, targets["train"][idx], recipe, amp)
        _sync(device)
        epoch_s = time.perf_counter() - t0
        train_time += epoch_s
        if epoch > 0:  # the first epoch pays for cuDNN autotuning and allocator warm-up
            steady_time += epoch_s
            trained_images += steps_per_epoch * cfg.batch_size
        epoch += 1
        record: dict[str, Any] = {"epoch": epoch, "train_loss": float(loss_sum) / steps_per_epoch,
                                  "epoch_s": epoch_s, "lr": state.last_lr()}
        if epoch % cfg.eval_every == 0 or epoch == state.schedule.epochs:
            # Both the raw weights and their moving average compete on val.
            for which, net in state.candidates().items():
                if recipe.precise_bn_batches:
                    precise_bn(net, _clean_batches(store["train"], preset, cfg.batch_size, recipe.precise_bn_batches,
                                                   generator), amp)
                logits, _ = _predict(net, store["val"], preset, amp)
                val = classification_metrics(pack.labels["val"], logits.argmax(1))
                suffix = "" if which == "raw" else "_ema"
                record.update({f"val_accuracy{suffix}": val["accuracy"], f"val_macro_f1{suffix}": val["macro_f1"]})
                if val["macro_f1"] > best["macro_f1"]:
                    best = {"epoch": epoch, "weights": which, "macro_f1": val["macro_f1"], "accuracy": val["accuracy"]}
                    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        history.append(record)
        if cfg.time_budget_s and epoch == 2 and epoch < state.schedule.epochs:
            fits = int((cfg.time_budget_s - train_time) / max(epoch_s, 1e-6)) + epoch
            if fits < state.schedule.epochs:
                # Shorten the cosine so the run still ends at a low learning rate.
                state.schedule.epochs = max(epoch + 1, fits)
                stopped_early = True
        progress = dict(epoch=epoch, history=history, best=best, trained_images=trained_images, steady_time=steady_time,
                        train_time=train_time, stopped_early=stopped_early, planned_epochs=cfg.epochs,
                        schedule_epochs=state.schedule.epochs)
        save_pack_run(cfg.output, key, state, generator, robust_rng, progress, best_state, cfg.model, kwargs, preset)
        # Printed once saved: an epoch on the console is an epoch a killed run will not train again.
        print(json.dumps({"model": cfg.model, **record}), flush=True)

    if robust_batches is not None:
        robust_batches.close()
    eval_model = state.candidates()[best["weights"]]
    eval_model.load_state_dict(best_state)
    return _finish(cfg, pack, eval_model, store, preset, amp, kwargs, {
        "model": cfg.model, "model_kwargs": cfg.model_kwargs, "input_size": size,
        "parameters": count_parameters(eval_model), "epochs_run": epoch, "epochs_planned": cfg.epochs,
        "shortened_to_fit_time_budget": stopped_early, "best_epoch": best["epoch"],
        "best_weights": best["weights"], "train_time_s": train_time, "pack_load_s": load_s,
        "train_images_per_s": trained_images / steady_time if steady_time else None,
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu", **precision.to_dict(),
    }, history)


def _finish(cfg: PackedTrainConfig, pack: LoadedPack, eval_model, store, preset: EvalPreset, amp,
            kwargs: dict[str, Any], result: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """Score the selected weights on val (and test), write the checkpoint, the run's split and ``result.json``."""
    from bloodray.checkpoint import CheckpointMetadata, write_checkpoint
    from bloodray.evaluation.metrics import classification_metrics

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    val_logits, _ = _predict(eval_model, store["val"], preset, amp)
    result |= {"val": classification_metrics(pack.labels["val"], val_logits.argmax(1)),
               "history": history, "config": asdict(cfg), "pack": pack.meta}
    if "test" in store:
        test_logits, eval_rate = _predict(eval_model, store["test"], preset, amp)
        result["test"] = classification_metrics(pack.labels["test"], test_logits.argmax(1))
        result["eval_images_per_s"] = eval_rate
        np.save(out / "test_logits.npy", test_logits)
    np.save(out / "val_logits.npy", val_logits)
    metadata = CheckpointMetadata(
        model_name=cfg.model, classes=list(CLASS_NAMES), input_size=pack.input_size, mean=list(preset.mean),
        std=list(preset.std), stain_norm=preset.stain.to_metadata() if preset.stain else {}, model_kwargs=kwargs,
        epoch=result["best_epoch"],
        metrics={"val_accuracy": result["val"]["accuracy"], "val_macro_f1": result["val"]["macro_f1"]},
        history=[{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in history],
        config={"trainer": "bloodray.train.pack", **asdict(cfg)})
    write_checkpoint(out / "checkpoint", eval_model, metadata)
    write_split_manifest(cfg.pack, out)
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return result
