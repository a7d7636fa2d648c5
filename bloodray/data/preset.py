"""The evaluation preset.

The evaluation preset (:class:`EvalPreset`) is the one and only preprocessing
used by evaluation and by the nightly classification job: decode to RGB
(:mod:`bloodray.data.decode`), resize to the model's square input size, then,
in :meth:`EvalPreset.normalize`, stain-normalise when the checkpoint says so
(:mod:`bloodray.data.stain`) and normalize with the model's mean/std. Training augmentation (:mod:`bloodray.data.augment`)
is separate and runs on already-resized uint8 images, so both paths see pixels
prepared the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from bloodray.data.decode import DEFAULT_MAX_PIXELS, CellImageLimits, decode_image
from bloodray.data.stain import StainReference, reinhard, reinhard_uint8


@dataclass(frozen=True)
class EvalPreset:
    """The shared evaluation/inference preset: resize to a square, normalize.

    Built from a model's :class:`~bloodray.models.ModelInfo` (or a checkpoint's
    metadata) so input size and normalization always match the weights.
    """

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: Reinhard stain normalisation towards the training lab's colours; None = off (models trained without it).
    stain: StainReference | None = None

    def load(self, data: bytes) -> np.ndarray:
        """Decode bytes to a resized ``uint8`` HxWx3 array; raises :class:`~bloodray.data.decode.ImageDecodeError`."""
        return self.resize(self.decode(data))

    def decode(self, data: bytes, cell: CellImageLimits | None = None) -> Image.Image:
        """Decode bytes to an RGB PIL image before the resize: JPEGs at the smallest DCT scale that still covers
        the input size (:func:`~bloodray.data.decode.decode_image`); ``cell`` checks the stored size."""
        return decode_image(data, target_size=self.input_size, max_pixels=self.max_pixels, cell=cell)

    def resize(self, image: Image.Image) -> np.ndarray:
        """Resize a PIL RGB image to the square input size (cells are centred crops)."""
        if image.size != (self.input_size, self.input_size):
            image = image.resize((self.input_size, self.input_size), Image.BILINEAR, reducing_gap=None)
        return np.asarray(image, dtype=np.uint8)

    def normalize(self, images, device=None, dtype=None, channels_last: bool = False):
        """uint8 NHWC batch (numpy or tensor) -> normalized float NCHW tensor on ``device``.

        A numpy batch is stain-normalised on the CPU in uint8 (:func:`~bloodray.data.stain.reinhard_uint8`,
        the fast path); a tensor (e.g. decoded on the GPU) with the float transform where it lies.
        """
        import torch

        if self.stain is not None and isinstance(images, np.ndarray):
            batch = torch.from_numpy(reinhard_uint8(images, self.stain))
            if device is not None:
                batch = batch.to(device, non_blocking=True)
            batch = self.standardize(batch.permute(0, 3, 1, 2), stain=False)
        else:
            batch = torch.as_tensor(images)
            if device is not None:
                # Move uint8 first: a quarter of the bytes of float32 cross the bus.
                batch = batch.to(device, non_blocking=True)
            batch = self.standardize(batch.permute(0, 3, 1, 2).float().div_(255.0))
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        if dtype is not None:
            batch = batch.to(dtype)
        return batch

    def standardize(self, batch, stain: bool = True):
        """Float NCHW tensor in [0, 1] -> the model's input: stain-normalised (when set and ``stain``), then mean/std.

        The packed trainer augments on float tensors and calls this directly; everything else goes through
        :meth:`normalize`.
        """
        import torch

        if stain and self.stain is not None:
            # After augmentation, on exactly what the model sees: training learns the colours inference produces.
            batch = reinhard(batch, self.stain)
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return (batch - mean) / std
