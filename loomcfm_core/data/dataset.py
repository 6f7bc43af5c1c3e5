"""Random-access reading of a cached dataset, from a node-local copy of its shards.

Every shard is checked against the manifest before use (:mod:`loomcfm_core.data.manifest`): remote ones are
copied once per node into ``data.local_cache`` and checked there, local ones where they are, so a torn,
stale or modified shard is never read. With ``hflip`` the dataset doubles: index
``i + N`` is image ``i`` mirrored, so a flipped image is a data point of its own (LOOM gives it its own
noise seeds). A latent cache stores those points already (flipped in pixel space, then encoded).
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from loomcfm_core.data.manifest import local_shards, require_manifest
from loomcfm_core.errors import UsageError


class ShardedDataset(Dataset):
    """Items are ``(image float32 [C,H,W] in [-1, 1], label, index)``; ``index`` is the LOOM data-point id.

    A reflow-pairs dataset (manifest ``kind: pairs``) serves its generated ``target`` instead of an image,
    and exposes every item's noise: as ``pair_seeds`` (our pairs, a seed per item) or through
    :meth:`pair_noise` (pairs cached from the reference's layout, which store the noise arrays). A latent
    cache (``kind: latents``) serves its stored rows as float32 (:mod:`loomcfm_core.data.latents`).
    """

    def __init__(self, uri: str, split: str = "train", hflip: bool = False,
                 local_cache: str = "~/.cache/loomcfm") -> None:
        manifest = require_manifest(uri)
        self.is_pairs = manifest.get("kind") == "pairs"
        if self.is_pairs and hflip:
            raise UsageError(f"{uri} holds reflow pairs, whose noise is fixed per target: set data.hflip=false")
        # A latent cache holds its flipped points as rows N..2N-1: they are read, not mirrored.
        self.stored_flips = manifest.get("kind") == "latents" and manifest["hflip"]
        if manifest.get("kind") == "latents" and split == "train" and hflip != manifest["hflip"]:
            raise UsageError(f"{uri} was encoded with data.hflip={str(manifest['hflip']).lower()}: set it so")
        self.uri, self.manifest, self.hflip = uri, manifest, hflip
        self.array = manifest.get("array", "target" if self.is_pairs else "images")
        self.paths = local_shards(uri, manifest, split, local_cache)
        counts = [s["count"] for s in manifest["splits"][split]["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.num_images = int(self.offsets[-1]) // (2 if self.stored_flips else 1)
        self.labels = self._read_all("labels")
        self.stored_noise = self.is_pairs and "noise" in manifest.get("arrays", {})
        seeded = self.is_pairs and not self.stored_noise
        self.pair_seeds = torch.from_numpy(self._read_all("seeds")) if seeded else None
        self._images: dict[tuple[int, str], h5py.Dataset] = {}
        self._pid = -1

    def _read_all(self, name: str) -> np.ndarray:
        """A small per-item array of every shard (zeros where a shard lacks it), kept in memory."""
        parts = []
        for path in self.paths:
            with h5py.File(path, "r") as fh:
                parts.append(fh[name][:] if name in fh else np.zeros(len(fh[self.array]), np.int64))
        return np.concatenate(parts)

    def __len__(self) -> int:
        return self.num_images * (2 if self.hflip else 1)

    def _shard_array(self, shard: int, name: str) -> h5py.Dataset:
        # h5py handles must not cross a fork: DataLoader workers each open their own. Keeping the dataset
        # object (not the file) skips a name lookup per read, which costs more than the read itself.
        if self._pid != os.getpid():
            self._images, self._pid = {}, os.getpid()
        if (shard, name) not in self._images:
            self._images[shard, name] = h5py.File(self.paths[shard], "r")[name]
        return self._images[shard, name]

    def _locate(self, image_index: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.offsets, image_index, side="right")) - 1
        return shard, image_index - int(self.offsets[shard])

    def pair_noise(self, index: torch.Tensor) -> torch.Tensor:
        """The stored noise arrays of the given pairs (float32 [b, C, H, W], on the CPU)."""
        if not self.stored_noise:
            raise UsageError(f"{self.uri} stores no noise arrays (its pairs are seeded: use pair_seeds)")
        rows = []
        for i in index.tolist():
            shard, row = self._locate(i)
            rows.append(self._shard_array(shard, "noise")[row])
        return torch.from_numpy(np.stack(rows))

    def read(self, index: int) -> tuple[np.ndarray, int]:
        """The raw stored item (uint8 images and pair targets, float32 pair targets, float16 latents) and its
        label, flipped past N."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        flip, row = (0, index) if self.stored_flips else divmod(index, self.num_images)
        shard, offset = self._locate(row)
        item = self._shard_array(shard, self.array)[offset]
        return (item[..., ::-1] if flip else item), int(self.labels[row])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        item, label = self.read(index)
        image = torch.from_numpy(np.ascontiguousarray(item))
        if image.dtype == torch.uint8:
            image = image.float().div_(127.5).sub_(1.0)
        elif image.dtype == torch.float16:
            image = image.float()
        return image, label, index

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_images"], state["_pid"] = {}, -1
        return state
