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

import inspect
import io
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from bloodray.classes import CLASS_NAMES, NUM_CLASSES
from bloodray.config import ConfigError
from bloodray.data.labelled import SplitFractions, build_split, read_many
from bloodray.data.preset import EvalPreset

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
    from bloodray.rundir import SPLIT_MANIFEST

    table = pq.read_table(str(pack_path), columns=["uri", "class_name", "label", "sha256", "split"])
    dest = Path(output_dir) / SPLIT_MANIFEST
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
class PackedTrainConfig:
    """One single-process training run on a pack (see module docstring)."""

    pack: str = ""
    output: str = "runs/packed"
    model: str = "bloodnet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    #: start from the weights of this bloodray checkpoint (same model and kwargs),
    #: e.g. to fine-tune on a lossless pack after training on a compressed one.
    init_checkpoint: str = ""
    epochs: int = 60
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 3
    label_smoothing: float = 0.1
    #: decay of the exponential moving average of the weights (0 = off); the
    #: average and the raw weights are both scored on val, the better one is kept.
    ema_decay: float = 0.999
    #: random rotation is any angle: cell orientation carries no meaning.
    rotate: bool = True
    flips: bool = True
    min_scale: float = 0.9
    max_scale: float = 1.1
    translate: float = 0.05
    color_jitter: float = 0.1
    hue_jitter: float = 0.02
    eval_every: int = 1
    #: before each evaluation, re-estimate BatchNorm statistics from this many
    #: un-augmented training batches ("precise BN"; 0 = off). Running averages
    #: collected under heavy augmentation and a moving network can be far from
    #: what clean images produce, which hurts deep BN networks most.
    precise_bn_batches: int = 0
    #: stop starting new epochs after this many seconds of training (0 = no limit);
    #: the schedule is shortened to fit once the epoch time is known.
    time_budget_s: float = 0.0
    seed: int = 0
    device: str = "auto"
    #: bf16 autocast and channels_last on a GPU.
    mixed_precision: bool = True

    def validate(self, prefix: str = "") -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        if not self.pack:
            raise ConfigError("pack: path of a pack written by `python jobs/pack.py` is required")
        for name in ("epochs", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1 (got {getattr(self, name)})")
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0 (got {self.lr})")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay: must be in [0, 1) (got {self.ema_decay})")
        if not 0 < self.min_scale <= self.max_scale:
            raise ConfigError(f"min_scale/max_scale: need 0 < min_scale <= max_scale (got {self.min_scale}, {self.max_scale})")


def augment_on_device(images, cfg: PackedTrainConfig, generator=None):
    """Batched augmentation of a ``uint8`` NHWC tensor; returns float NCHW in [0, 1].

    One affine warp per batch (rotation by any angle, mirror, zoom, shift) with
    reflected borders, then brightness/contrast/saturation and a hue rotation,
    all as tensor ops so the cost does not grow with Python per image.
    """
    import torch
    import torch.nn.functional as F

    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    n, device = x.shape[0], x.device

    def uniform(lo, hi, *shape):
        return torch.rand(*shape, device=device, generator=generator) * (hi - lo) + lo

    angle = uniform(0, 2 * math.pi, n) if cfg.rotate else torch.zeros(n, device=device)
    scale = uniform(cfg.min_scale, cfg.max_scale, n)
    mirror = (torch.where(torch.rand(n, device=device, generator=generator) < 0.5, -1.0, 1.0)
              if cfg.flips else torch.ones(n, device=device))
    shift = uniform(-cfg.translate, cfg.translate, n, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * mirror, -sin, shift[:, 0]], 1),
                         torch.stack([sin * mirror, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    j = cfg.color_jitter
    if j > 0:
        x = x * uniform(1 - j, 1 + j, n, 1, 1, 1)
        gray = x.mean(1, keepdim=True)
        x = gray + (x - gray) * uniform(1 - j, 1 + j, n, 1, 1, 1)
        mean = x.mean((1, 2, 3), keepdim=True)
        x = mean + (x - mean) * uniform(1 - j, 1 + j, n, 1, 1, 1)
    if cfg.hue_jitter > 0:
        # A small hue shift is a rotation of the chroma plane around the grey axis.
        a = uniform(-cfg.hue_jitter, cfg.hue_jitter, n) * 2 * math.pi
        c, s, k = torch.cos(a), torch.sin(a), 1.0 / 3.0
        q = math.sqrt(k)
        rot = torch.stack([
            torch.stack([c + (1 - c) * k, k * (1 - c) - q * s, k * (1 - c) + q * s], 1),
            torch.stack([k * (1 - c) + q * s, c + k * (1 - c), k * (1 - c) - q * s], 1),
            torch.stack([k * (1 - c) - q * s, k * (1 - c) + q * s, c + k * (1 - c)], 1),
        ], 1)
        x = torch.einsum("nij,njhw->nihw", rot, x)
    return x.clamp_(0.0, 1.0)


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # Norm scales and biases are not weights to shrink.
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_packed(cfg: PackedTrainConfig) -> dict[str, Any]:
    """Train ``cfg.model`` on a pack; write a bloodray checkpoint and ``result.json`` to ``cfg.output``.

    Model selection uses the val split only (best val macro-F1 over the
    evaluations); the test split, when the pack has one, is scored once at the
    end with the selected weights.
    """
    import contextlib

    import torch
    import torch.nn.functional as F
    import copy

    from bloodray.checkpoint import CheckpointMetadata, write_checkpoint
    from bloodray.evaluation.metrics import classification_metrics
    from bloodray.models import count_parameters, create_model, get_model_info

    cfg.validate()
    info = get_model_info(cfg.model)  # unknown names fail before any data is read
    torch.manual_seed(cfg.seed)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    t_load = time.perf_counter()
    pack = load_pack(cfg.pack)
    for needed in ("train", "val"):
        if needed not in pack.images:
            raise PackError(f"{cfg.pack}: the pack has no {needed!r} images")
    store = {s: torch.from_numpy(a).to(device) for s, a in pack.images.items()}
    targets = {s: torch.from_numpy(a).to(device) for s, a in pack.labels.items()}
    load_s = time.perf_counter() - t_load
    size = pack.input_size
    # Evaluation uses the inference preset itself; training normalizes its augmented floats the same way.
    preset = EvalPreset(size, info.mean, info.std)
    mean = torch.tensor(info.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(info.std, device=device).view(1, 3, 1, 1)
    memory_format = torch.channels_last if on_gpu else torch.contiguous_format
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu and cfg.mixed_precision
           else contextlib.nullcontext())

    builder_kwargs = dict(cfg.model_kwargs)
    # Only builders whose architecture depends on the input size take it (bloodnet's dense layer).
    if "input_size" in inspect.signature(info.builder).parameters:
        builder_kwargs["input_size"] = size
    model = create_model(cfg.model, NUM_CLASSES, pretrained=False, **builder_kwargs)
    if cfg.init_checkpoint:
        from bloodray.checkpoint import load_checkpoint

        start = load_checkpoint(cfg.init_checkpoint, device="cpu")
        if start.metadata.model_name != cfg.model or start.metadata.input_size != size:
            raise ConfigError(f"init_checkpoint: {cfg.init_checkpoint} holds {start.metadata.model_name} at "
                              f"{start.metadata.input_size} px, not {cfg.model} at {size} px")
        model.load_state_dict(start.model.state_dict())
    model = model.to(device, memory_format=memory_format)
    ema = copy.deepcopy(model).eval() if cfg.ema_decay > 0 else None
    if ema is not None:
        for p in ema.parameters():
            p.requires_grad_(False)
        ema_pairs = [(e, m) for e, m in zip(ema.state_dict().values(), model.state_dict().values())]
        ema_float = [(e, m) for e, m in ema_pairs if e.is_floating_point()]
        ema_other = [(e, m) for e, m in ema_pairs if not e.is_floating_point()]

    @torch.no_grad()
    def update_ema(step: int) -> None:
        # Warm-up (as in timm/TF): early on the average would be mostly random init.
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_([e for e, _ in ema_float], [m for _, m in ema_float], 1.0 - decay)
        for e, m in ema_other:
            e.copy_(m)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    n_train = len(pack.labels["train"])
    steps_per_epoch = n_train // cfg.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"batch_size: {cfg.batch_size} is larger than the {n_train} training images")
    planned_epochs = cfg.epochs
    warmup_steps = cfg.warmup_epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return cfg.lr * (step + 1) / warmup_steps
        total = max(1, planned_epochs * steps_per_epoch - warmup_steps)
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / total)))

    candidates = {"raw": model, **({"ema": ema} if ema is not None else {})}

    @torch.inference_mode()
    def predict(net, split: str, batch: int = 512) -> tuple[np.ndarray, float]:
        net.eval()
        outs = []
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for start in range(0, len(store[split]), batch):
            x = preset.normalize(store[split][start:start + batch], channels_last=on_gpu)
            with amp:
                outs.append(net(x).float())
        logits = torch.cat(outs)
        if on_gpu:
            torch.cuda.synchronize()
        return logits.cpu().numpy(), len(logits) / (time.perf_counter() - t0)

    @torch.no_grad()
    def precise_bn(net) -> None:
        norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not norms or not cfg.precise_bn_batches:
            return
        saved = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
        net.train()
        picks = torch.randperm(n_train, device=device, generator=generator)
        for b in range(min(cfg.precise_bn_batches, steps_per_epoch)):
            idx = picks[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            with amp:
                net(preset.normalize(store["train"][idx], channels_last=on_gpu))
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
        net.eval()

    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"macro_f1": -1.0}
    best_state = None
    step, trained_images, steady_time, train_time = 0, 0, 0.0, 0.0
    epoch = 0
    stopped_early = False
    while epoch < planned_epochs:
        model.train()
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        order = torch.randperm(n_train, device=device, generator=generator)
        loss_sum = torch.zeros((), device=device)
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x = augment_on_device(store["train"][idx], cfg, generator)
            x = ((x - mean) / std).contiguous(memory_format=memory_format)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            with amp:
                loss = F.cross_entropy(model(x).float(), targets["train"][idx], label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                update_ema(step)
            loss_sum += loss.detach()
            step += 1
        if on_gpu:
            torch.cuda.synchronize()
        epoch_s = time.perf_counter() - t0
        train_time += epoch_s
        if epoch > 0:  # the first epoch pays for cuDNN autotuning and allocator warm-up
            steady_time += epoch_s
            trained_images += steps_per_epoch * cfg.batch_size
        epoch += 1
        record: dict[str, Any] = {"epoch": epoch, "train_loss": float(loss_sum) / steps_per_epoch,
                                  "epoch_s": epoch_s, "lr": lr_at(step - 1)}
        if epoch % cfg.eval_every == 0 or epoch == planned_epochs:
            # Both the raw weights and their moving average compete on val.
            for which, net in candidates.items():
                precise_bn(net)
                logits, _ = predict(net, "val")
                val = classification_metrics(pack.labels["val"], logits.argmax(1))
                suffix = "" if which == "raw" else "_ema"
                record.update({f"val_accuracy{suffix}": val["accuracy"], f"val_macro_f1{suffix}": val["macro_f1"]})
                if val["macro_f1"] > best["macro_f1"]:
                    best = {"epoch": epoch, "weights": which, "macro_f1": val["macro_f1"], "accuracy": val["accuracy"]}
                    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        history.append(record)
        print(json.dumps({"model": cfg.model, **record}), flush=True)
        if cfg.time_budget_s and epoch == 2 and epoch < planned_epochs:
            fits = int((cfg.time_budget_s - train_time) / max(epoch_s, 1e-6)) + epoch
            if fits < planned_epochs:
                # Shorten the cosine so the run still ends at a low learning rate.
                planned_epochs = max(epoch + 1, fits)
                stopped_early = True

    eval_model = candidates[best["weights"]]
    eval_model.load_state_dict(best_state)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    val_logits, _ = predict(eval_model, "val")
    result: dict[str, Any] = {
        "model": cfg.model, "model_kwargs": cfg.model_kwargs, "input_size": size,
        "parameters": count_parameters(eval_model), "epochs_run": epoch, "epochs_planned": cfg.epochs,
        "shortened_to_fit_time_budget": stopped_early, "best_epoch": best["epoch"],
        "best_weights": best["weights"], "train_time_s": train_time, "pack_load_s": load_s,
        "train_images_per_s": trained_images / steady_time if steady_time else None,
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "val": classification_metrics(pack.labels["val"], val_logits.argmax(1)),
        "history": history, "config": asdict(cfg), "pack": pack.meta,
    }
    if "test" in store:
        test_logits, eval_rate = predict(eval_model, "test")
        result["test"] = classification_metrics(pack.labels["test"], test_logits.argmax(1))
        result["eval_images_per_s"] = eval_rate
        np.save(out / "test_logits.npy", test_logits)
    np.save(out / "val_logits.npy", val_logits)
    metadata = CheckpointMetadata(
        model_name=cfg.model, classes=list(CLASS_NAMES), input_size=size, mean=list(info.mean),
        std=list(info.std), model_kwargs=builder_kwargs, epoch=best["epoch"],
        metrics={"val_accuracy": result["val"]["accuracy"], "val_macro_f1": result["val"]["macro_f1"]},
        history=[{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in history],
        config={"trainer": "bloodray.train.pack", **asdict(cfg)})
    write_checkpoint(out / "checkpoint", eval_model, metadata)
    write_split_manifest(cfg.pack, out)
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return result
