"""Reflow pairs on disk: how generated targets are stored, and the reference implementation's pairs layout.

Our pairs datasets hold each pair's noise as a *seed* and its target either as 8-bit pixels (``uint8``,
the default: clamped to [-1, 1] and rounded, exactly like a cached image, a quarter of float32's size) or
as the unclamped ``float32`` sample. The reference's ``generate_pairs.py`` truncates instead of rounding
(level ``floor(127.5·(x+1))``), and stores the levels as float32 together with the noise array itself;
:func:`reference_pairs_groups` reads that layout so a ``pairs:`` source can cache it.
"""

from __future__ import annotations

import numpy as np
import torch

from loomcfm_core.errors import UsageError
from loomcfm_core.sampling import to_uint8

TARGET_DTYPES = ("uint8", "float32")  # reflow.target_dtype


def store_targets(images: torch.Tensor, dtype: str) -> np.ndarray:
    """Generated samples in [-1, 1] (float, [n, C, H, W]) in the form a pairs dataset stores them.

    Args:
        dtype: ``uint8`` — clamped to [-1, 1] and rounded to the nearest of 256 levels, the form images are
            cached in (served back as ``level / 127.5 - 1``); ``float32`` — the samples as generated.
    """
    if dtype not in TARGET_DTYPES:
        raise UsageError(f"reflow.target_dtype must be one of {', '.join(TARGET_DTYPES)}, got {dtype!r}")
    if dtype == "float32":
        return images.float().numpy()
    return to_uint8(images.float()).numpy()
