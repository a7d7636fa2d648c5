"""JPEG decoding in batches on the model's device (nvJPEG on a GPU), with the CPU decoder as the fallback.

With ``inference.num_gpus > 0`` the nightly job's read tasks only read the files (:func:`read_files`: bytes,
SHA-256, read errors) and the model actor decodes each batch where the model runs (:func:`decode_on_device`):
``torchvision.io.decode_jpeg(..., device=...)`` for every JPEG, resized there to the model's input size. Anything
the device decoder refuses -- not a JPEG, a batch it cannot decode, one broken file -- goes through the CPU path
of :mod:`bloodray.data.decode` (the same limits and error kinds), and becomes an error row only if that fails
too. Tests run the same code on the CPU device; ``bench/gpu_decode.py`` measures it on a GPU.

The device path reads each JPEG's header first (PIL, no pixels decoded), so the pixel limit and the cell-size
limits refuse a file before any decoding, as on the CPU path. Resizing is bilinear with antialiasing on the
full-size picture; the CPU path decodes at a reduced DCT scale first, so the pixels differ by a few levels.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from typing import Any, Mapping

import numpy as np

from bloodray.data.decode import CellImageLimits, ImageDecodeError, decode_image
from bloodray.data.preset import EvalPreset
from bloodray.data.stages import ERROR_COLUMNS, InputReadError, ReadLimits, read_many

#: JPEG files start with the SOI marker.
JPEG_MAGIC = b"\xff\xd8\xff"


def read_files(batch: dict[str, np.ndarray], *, storage_options: Mapping[str, Any] | None = None,
               limits: ReadLimits = ReadLimits()) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: rows with a ``uri`` column -> the files' bytes (``data``), undecoded.

    Adds ``image_sha256``, the error columns and ``error`` as the read+decode stage does (read errors only);
    ``data`` is ``b""`` on an error row.
    """
    cols: dict[str, list] = {"image_sha256": [], **{c: [] for c in ERROR_COLUMNS}, "data": []}
    for data in read_many([str(u) for u in batch["uri"]], storage_options, limits):
        if isinstance(data, BaseException):
            kind = data.kind if isinstance(data, InputReadError) else "unreadable"
            message = str(data) if isinstance(data, InputReadError) else f"{type(data).__name__}: {data}"
            row = ("", "read", kind, message, b"")
        else:
            row = (hashlib.sha256(data).hexdigest(), "", "", "", data)
        for key, value in zip(cols, row):
            cols[key].append(value)
    out = {k: np.array(v, dtype=object) for k, v in cols.items()}
    out["error"] = np.array([f"{t}: {m}" if t else "" for t, m in zip(out["error_type"], out["message"])],
                            dtype=object)
    return {**batch, **out}


def decode_on_device(batch: dict[str, np.ndarray], preset: EvalPreset, device,
                     cell: CellImageLimits | None = None) -> tuple[dict[str, np.ndarray], Any]:
    """Decode a :func:`read_files` batch: JPEGs on ``device``, the rest (and refusals) on the CPU.

    Returns the batch with ``data`` replaced by ``image`` (uint8 NHWC numpy, for thumbnails), its error columns
    updated for files that fail both decoders, and the same images as a uint8 NHWC tensor on ``device``.
    """
    import torch

    size = preset.input_size
    n = len(batch["data"])
    images = torch.zeros((n, size, size, 3), dtype=torch.uint8, device=device)
    failed: dict[int, ImageDecodeError | Exception] = {}
    errors = np.asarray(batch["error"], dtype=object).astype(bool)
    jpegs = [i for i in range(n) if not errors[i] and _device_candidate(batch["data"][i], preset, cell)]
    decoded = _device_decode([batch["data"][i] for i in jpegs], device)
    on_cpu = [i for i in range(n) if not errors[i] and i not in set(jpegs)]
    for i, picture in zip(jpegs, decoded):
        if picture is None:
            on_cpu.append(i)  # refused by the device decoder: the CPU decides
            continue
        images[i] = _resize(picture, size)
    cpu_images = images.cpu().numpy()
    for i in on_cpu:
        try:
            pixels = preset.resize(decode_image(batch["data"][i], target_size=size, max_pixels=preset.max_pixels,
                                                cell=cell))
        except Exception as exc:  # noqa: BLE001 - an error row, never a failed batch
            failed[i] = exc
            continue
        cpu_images[i] = pixels
        images[i] = torch.as_tensor(np.array(pixels)).to(device)
    if cell is not None:
        for i in range(n):
            if not errors[i] and i not in failed:
                try:
                    cell.check_contrast(cpu_images[i])
                except ImageDecodeError as exc:
                    failed[i] = exc
    out = {k: v for k, v in batch.items() if k != "data"}
    for key in (*ERROR_COLUMNS, "error"):
        out[key] = np.array(out[key], dtype=object)
    for i, exc in failed.items():
        kind = exc.kind if isinstance(exc, ImageDecodeError) else "corrupt"
        message = str(exc) if isinstance(exc, ImageDecodeError) else f"{type(exc).__name__}: {exc}"
        out["stage"][i], out["error_type"][i], out["message"][i] = "decode", kind, message
        out["error"][i] = f"{kind}: {message}"
        cpu_images[i] = 0
    out["image"] = cpu_images
    return out, images


def _device_candidate(data: bytes, preset: EvalPreset, cell: CellImageLimits | None) -> bool:
    """A JPEG whose header passes the pixel and cell-size limits (else the CPU path decides and says why)."""
    if not data.startswith(JPEG_MAGIC):
        return False
    from PIL import Image

    try:
        width, height = Image.open(io.BytesIO(data)).size  # header only
    except Exception:  # noqa: BLE001 - the CPU path names the failure
        return False
    if width * height > preset.max_pixels:
        return False
    if cell is not None:
        try:
            cell.check_size(width, height)
        except ImageDecodeError:
            return False
    return True


def _device_decode(datas: list[bytes], device) -> list[Any]:
    """Decoded CHW uint8 RGB tensors on ``device``, ``None`` where the decoder refused a file."""
    if not datas:
        return []
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's notice about its image API; refusals raise
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
        except Exception:  # noqa: BLE001 - one bad file refuses the batch: retry one by one to find it
            pass
        out = []
        for tensor in tensors:
            try:
                out.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
            except Exception:  # noqa: BLE001
                out.append(None)
        return out


def _resize(picture, size: int):
    """CHW uint8 -> HWC uint8 at ``size`` x ``size`` (bilinear, antialiased), on the picture's device."""
    import torch

    if picture.shape[1:] != (size, size):
        resized = torch.nn.functional.interpolate(picture[None].float(), size=(size, size), mode="bilinear",
                                                  antialias=True, align_corners=False)
        picture = resized[0].round_().clamp_(0, 255).to(torch.uint8)
    return picture.permute(1, 2, 0)
