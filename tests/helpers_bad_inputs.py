"""Test helper: write inputs that must become error rows, beside good images.

:func:`write_bad_inputs` puts one file of each kind into a sample folder of a
folder-layout archive; :func:`write_bad_tar` writes a tar shard with unsafe
members (path traversal, absolute path, symlink, hard link, device) and a
few bad images. Each returns the expected ``{image_uri: error_type}`` so tests
can check every bad input appears in the errors table with its type.

``too_large`` expects the run to use ``limits.max_pixels`` below 360 000
(:data:`MAX_PIXELS_FOR_TESTS`), since the oversized image is 600 x 600.
"""

from __future__ import annotations

import io
import tarfile
from typing import Any, Mapping

import numpy as np
from PIL import Image

from bloodray import storage

#: ``limits.max_pixels`` the tests set so that the 600 x 600 PNG is refused.
MAX_PIXELS_FOR_TESTS = 200_000


def _jpeg(size: int = 64, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def bad_files() -> dict[str, tuple[bytes, str]]:
    """File name -> (bytes, expected error_type) for every bad-file kind."""
    jpeg = _jpeg()
    png16 = io.BytesIO()
    Image.fromarray(np.full((40, 40), 40_000, dtype=np.uint16)).save(png16, "PNG")  # mode I;16
    big = io.BytesIO()
    Image.new("RGB", (600, 600), (200, 120, 160)).save(big, "PNG")
    return {
        "zero_bytes.jpg": (b"", "empty"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        # A valid JPEG header followed by garbage: PIL parses the header, then fails on the data.
        "corrupt.jpg": (jpeg[:200] + bytes(range(256)) * 4, "corrupt"),
        "notes.jpg": (b"this is a text file with an image extension\n", "not_image"),
        "sixteen_bit.png": (png16.getvalue(), "unsupported_mode"),
        "huge.png": (big.getvalue(), "too_large"),
    }


def _write(uri: str, data: bytes, storage_options: Mapping[str, Any] | None) -> None:
    fs, path = storage.filesystem(uri, storage_options)
    if "://" not in uri:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as fh:
        fh.write(data)


def write_bad_inputs(archive_uri: str, sample_id: str,
                     storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Write every bad-file kind into ``<archive_uri>/<sample_id>/``; returns ``{uri: error_type}``."""
    expected = {}
    for name, (data, kind) in bad_files().items():
        uri = storage.join(archive_uri, sample_id, name)
        _write(uri, data, storage_options)
        expected[uri] = kind
    return expected


def write_bad_tar(archive_uri: str, sample_id: str, name: str = "bad-shard.tar",
                  storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Write a tar shard of unsafe members and bad images; returns ``{image_uri: error_type}``."""
    shard_uri = storage.join(archive_uri, name)
    buf = io.BytesIO()
    expected: dict[str, str] = {}
    good = _jpeg(seed=1)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(member: str, data: bytes = good, **attrs) -> None:
            info = tarfile.TarInfo(member)
            info.size = len(data) if attrs.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
            for key, value in attrs.items():
                setattr(info, key, value)
            tar.addfile(info, io.BytesIO(data) if info.size else None)

        add("../evil.jpg")
        expected[f"{shard_uri}#../evil.jpg"] = "unsafe_member"
        add("/abs.jpg")
        expected[f"{shard_uri}#/abs.jpg"] = "unsafe_member"
        add(f"{sample_id}/../../escape.jpg")
        expected[f"{shard_uri}#{sample_id}/../../escape.jpg"] = "unsafe_member"
        add(f"{sample_id}/link.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        expected[f"{shard_uri}#{sample_id}/link.jpg"] = "unsafe_member"
        add(f"{sample_id}/hard.jpg", type=tarfile.LNKTYPE, linkname=f"{sample_id}/zero.jpg")
        expected[f"{shard_uri}#{sample_id}/hard.jpg"] = "unsafe_member"
        add(f"{sample_id}/dev.jpg", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        expected[f"{shard_uri}#{sample_id}/dev.jpg"] = "unsafe_member"
        for file_name, (data, kind) in bad_files().items():
            add(f"{sample_id}/{file_name}", data)
            expected[f"{shard_uri}#{sample_id}/{file_name}"] = kind
    _write(shard_uri, buf.getvalue(), storage_options)
    return expected
