"""Random-access read throughput: the HDF5 cache vs the same images as PNG files in an ImageFolder.

Both go through a torch DataLoader with shuffling (random access) and the same number of workers, and both
deliver float tensors in [-1, 1]. Run: ``python benchmarks/data_loading.py [--num-images 10000]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import datasets, transforms

from loomcfm_core.config import load_config
from loomcfm_core.data.cache import cache_dataset
from loomcfm_core.data.dataset import ShardedDataset


def make_imagefolder(root: Path, num_images: int, resolution: int) -> None:
    """CIFAR-like images: smooth colour fields plus texture, so PNG compression is realistic."""
    rng = np.random.default_rng(0)
    for split, n in (("train", num_images), ("val", max(1, num_images // 10))):
        for i in range(n):
            folder = root / split / f"class_{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 256, size=(4, 4, 3)).astype(np.float32)
            smooth = np.asarray(Image.fromarray(base.astype(np.uint8)).resize((resolution, resolution),
                                                                               Image.Resampling.BICUBIC))
            noise = rng.normal(0, 12, size=smooth.shape)
            Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.png")


def throughput(dataset, batch_size: int, workers: int, epochs: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, drop_last=True)
    next(iter(loader))  # start the workers before timing
    start, seen = time.perf_counter(), 0
    for _ in range(epochs):
        for batch in loader:
            seen += len(batch[0])
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-images", type=int, default=10_000)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "folder"
        t0 = time.perf_counter()
        make_imagefolder(folder, args.num_images, args.resolution)
        cfg = load_config("digits", [f"data.source=imagefolder:{folder}", "data.channels=3",
                                     f"data.resolution={args.resolution}", "model.attn_resolutions=[]",
                                     f"storage.root={tmp}/store", "data.name=bench"])
        t1 = time.perf_counter()
        uri = cache_dataset(cfg).uri
        t2 = time.perf_counter()
        png = datasets.ImageFolder(str(folder / "train"), transform=transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]))
        hdf5 = ShardedDataset(uri, "train")
        rows = [("PNG ImageFolder (torchvision)", throughput(png, args.batch_size, args.workers, args.epochs)),
                ("HDF5 cache (ShardedDataset)", throughput(hdf5, args.batch_size, args.workers, args.epochs))]
    print(f"\n{args.num_images} images 3x{args.resolution}x{args.resolution}, batch {args.batch_size}, "
          f"{args.workers} DataLoader workers, shuffled, {args.epochs} epochs "
          f"(writing PNGs {t1 - t0:.1f} s, caching to HDF5 {t2 - t1:.1f} s)")
    print(f"| {'reader':<32} | {'images/s':>10} | {'vs PNG':>7} |")
    print(f"|{'-' * 34}|{'-' * 12}|{'-' * 9}|")
    for name, rate in rows:
        print(f"| {name:<32} | {rate:>10,.0f} | {rate / rows[0][1]:>6.2f}x |")


if __name__ == "__main__":
    main()
