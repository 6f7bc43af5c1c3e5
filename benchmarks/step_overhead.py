"""What LOOM costs per training step, and how fast noise is regenerated from seeds.

1. Noise for 128 x 3 x 32 x 32 seeds: ours (``noise_from_seeds``, one vectorised counter-based call on the
   training device), plain ``torch.randn`` of that shape (the floor), and one ``torch.Generator`` per sample
   on the CPU (the reference implementation's way; on a GPU it also pays the host-to-device copy).
2. Time per training step (same model, same batch) with the ``loom`` and the ``independent`` coupling, for
   the digits and cifar10 presets; LOOM's overhead is the extra time of its coupling call (gather, noise,
   cost matrix, Hungarian, seed write-back) as a share of the step.

Runs on the CPU, and also on CUDA (cifar10 preset, bf16 autocast) when a GPU is present.
Run: ``python benchmarks/step_overhead.py [--steps 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from loomcfm_core.config import load_config
from loomcfm_core.coupling import noise_from_seeds, random_seeds
from loomcfm_core.training.step import build_state, train_step


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in ms, synchronising the device around each call."""
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def noise_rows(device: torch.device, repeats: int) -> list[tuple[str, float]]:
    shape, batch = (3, 32, 32), 128
    seeds = random_seeds(batch, torch.Generator().manual_seed(0))
    seeds_dev = seeds.to(device)

    def per_sample():
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        return noise.to(device)

    return [("noise_from_seeds (ours)", timed(lambda: noise_from_seeds(seeds_dev, shape), repeats, device)),
            ("torch.randn (floor)", timed(lambda: torch.randn(batch, *shape, device=device), repeats, device)),
            ("per-sample torch.Generator on CPU" + (" + copy" if device.type == "cuda" else ""),
             timed(per_sample, repeats, device))]


def step_rows(preset: str, device: torch.device, steps: int, bf16: bool) -> dict:
    cfg = load_config(preset, [f"train.bf16={str(bf16).lower()}"])
    shape = cfg.data.shape
    batch, num_points = cfg.train.batch_size, 50_000
    x1 = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    index = torch.arange(batch)
    out = {"preset": preset, "batch": batch}
    for kind in ("independent", "loom"):
        cfg.coupling.kind = kind
        state = build_state(cfg, num_points, device)
        out[f"step_{kind}"] = timed(lambda: train_step(state, x1, index), steps, device)
        out[f"couple_{kind}"] = timed(lambda: state.coupling.couple(x1, index), steps * 4, device)
    out["overhead"] = (out["couple_loom"] - out["couple_independent"]) / out["step_independent"]
    out["images_per_s"] = batch / out["step_loom"] * 1e3
    return out


def print_tables(device: torch.device, presets: list[str], steps: int, bf16: bool) -> None:
    print(f"\n## {device.type.upper()}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                          f" ({torch.get_num_threads()} threads)"))
    print("\nnoise for 128 x 3 x 32 x 32:\n")
    print(f"| {'method':<40} | {'ms':>8} |\n|{'-' * 42}|{'-' * 10}|")
    rows = noise_rows(device, 20)
    for name, ms in rows:
        print(f"| {name:<40} | {ms:>8.3f} |")
    print(f"\nours vs per-sample: {rows[2][1] / rows[0][1]:.1f}x faster; ours vs randn floor: "
          f"{rows[0][1] / rows[1][1]:.2f}x")
    print(f"\ntraining step (median of {steps}{', bf16 autocast' if bf16 else ''}):\n")
    print(f"| {'preset':<8} | {'batch':>5} | {'independent ms':>14} | {'loom ms':>9} | {'couple indep ms':>15} | "
          f"{'couple loom ms':>14} | {'LOOM overhead':>13} | {'img/s (loom)':>12} |")
    print("|" + "|".join("-" * w for w in (10, 7, 16, 11, 17, 16, 15, 14)) + "|")
    for preset in presets:
        r = step_rows(preset, device, steps, bf16)
        print(f"| {r['preset']:<8} | {r['batch']:>5} | {r['step_independent']:>14.1f} | {r['step_loom']:>9.1f} | "
              f"{r['couple_independent']:>15.2f} | {r['couple_loom']:>14.2f} | {r['overhead']:>12.2%} | "
              f"{r['images_per_s']:>12.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--presets", nargs="+", default=["digits", "cifar10"])
    args = parser.parse_args()
    print_tables(torch.device("cpu"), args.presets, args.steps, bf16=False)
    if torch.cuda.is_available():
        print_tables(torch.device("cuda"), ["cifar10"], max(args.steps, 20), bf16=True)
    else:
        print("\n(no GPU here: the CUDA rows need one)")


if __name__ == "__main__":
    main()
