"""What the latent cache costs per image: encode (and, for evaluation, decode) with Stable Diffusion's KL-f8.

Builds the autoencoder of ``model.autoencoder`` in the ``ffhq256_latent`` preset's layout (SD's KL-f8: 128,
256, 512, 512 channels, two blocks per level; random weights cost the same as trained ones) and prints,
per batch size, seconds per image to encode and to decode and the peak memory per image of an encode
batch. Each batch size runs in a fresh process, so its peak memory is its own (CUDA: the allocator's peak
over what was allocated before; CPU: the resident set sampled every 2 ms during the encode, over the resident
set before it). GFLOP per image are counted by ``torch.utils.flop_counter`` (2 FLOPs per multiply-add).

Run: ``python benchmarks/latent_cache.py [--resolution 256] [--batches 1 4 8] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch


def kl_f8(resolution: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         sample_size=resolution).eval().requires_grad_(False)


def gflop(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def resident_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakResident:
    """The largest resident set seen while the ``with`` body runs (polled from a thread)."""

    def __enter__(self) -> PeakResident:
        self.peak, self._stop = resident_mib(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, resident_mib())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_mib())


def measure(batch: int, resolution: int, device: str) -> dict:
    """One batch size, in this process: seconds per image (encode, decode) and peak MiB per image (encode)."""
    model = kl_f8(resolution).to(device)
    x = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20 if device == "cuda" else resident_mib()
        sync()
        start = time.perf_counter()
        with PeakResident() as resident:
            latents = model.encode(x).latent_dist.mean
            sync()
        encode = (time.perf_counter() - start) / batch
        peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else resident.peak
        start = time.perf_counter()
        model.decode(latents)
        sync()
        decode = (time.perf_counter() - start) / batch
    return {"batch": batch, "encode_s": encode, "decode_s": decode, "mib_per_image": (peak - before) / batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process: measure one batch size
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.resolution, args.device)))
        return
    model, x = kl_f8(args.resolution), torch.zeros(1, 3, args.resolution, args.resolution)
    with torch.no_grad():
        encode_gflop = gflop(lambda: model.encode(x))
        decode_gflop = gflop(lambda: model.decode(torch.zeros(1, 4, args.resolution // 8, args.resolution // 8)))
    print(f"KL-f8 at {args.resolution}x{args.resolution} on {args.device} ({torch.get_num_threads()} threads): "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {encode_gflop:.0f} GFLOP per "
          f"image to encode, {decode_gflop:.0f} to decode")
    print("| batch | encode s/image | decode s/image | encode peak MiB/image |\n|---|---|---|---|")
    for batch in args.batches:
        out = subprocess.run([sys.executable, __file__, "--one", str(batch), "--resolution", str(args.resolution),
                              "--device", args.device], capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"| {batch} | {row['encode_s']:.3f} | {row['decode_s']:.3f} | {row['mib_per_image']:.0f} |")


if __name__ == "__main__":
    main()
