"""Decoding one image file into the cached layout: uint8 [C, H, W] with ``data.channels`` and ``data.resolution``.

An image whose colour mode has another channel count than ``data.channels`` (an RGB photo in a greyscale
dataset) is an error naming the file, unless ``data.convert`` asks for the conversion; a converted image
is counted, and the cache logs the count, so a conversion is never silent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loomcfm_core.errors import SourceError

MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # data.channels -> the PIL mode images are stored in
# PIL modes that become data.channels values per pixel without losing anything (a palette expands to RGB);
# anything else needs data.convert.
NATIVE = {1: {"L", "1"}, 3: {"RGB", "P"}, 4: {"RGBA"}}


def read_image(path: Path, channels: int, resolution: int, resize: bool = False,
               convert: bool = False) -> tuple[np.ndarray, str | None]:
    """The image at ``path`` as uint8 [C, H, W], and the mode it was converted from (None if it was not).

    Raises:
        SourceError: not decodable, another size without ``resize``, another colour mode without ``convert``.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            converted = None
            if img.mode not in NATIVE[channels]:
                if not convert:
                    raise SourceError(f"{path}: a {img.mode} image with {len(img.getbands())} channels, but "
                                      f"data.channels={channels}; set data.convert=true to convert it to "
                                      f"{MODES[channels]} (or data.channels to the images' channels)")
                converted = img.mode
            img = img.convert(MODES[channels])
            if img.size != (resolution, resolution):
                if not resize:
                    raise SourceError(f"{path}: image is {img.size[0]}x{img.size[1]}, expected "
                                      f"{resolution}x{resolution} (set data.resize=true to resize and centre-crop)")
                scale = resolution / min(img.size)
                img = img.resize((max(resolution, round(img.size[0] * scale)),
                                  max(resolution, round(img.size[1] * scale))), Image.Resampling.BICUBIC)
                left, top = (img.size[0] - resolution) // 2, (img.size[1] - resolution) // 2
                img = img.crop((left, top, left + resolution, top + resolution))
            array = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise SourceError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    return (array[None] if array.ndim == 2 else array.transpose(2, 0, 1)), converted
