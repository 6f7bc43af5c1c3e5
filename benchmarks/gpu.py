"""The GPU check in one command: what LOOM costs on a GPU, and how fast sampling and scoring run there.

Sections (each prints its table, or its error and goes on; the whole run stops starting sections after
``--budget`` seconds, default 420, so it ends within 8 minutes on one GPU):

1. noise: ``noise_from_seeds`` eager vs compiled (``torch.compile``, what training uses on CUDA) vs one CPU
   ``torch.Generator`` per sample plus the copy (the reference implementation's way); whether the compiled
   GPU integer stream is bit-identical to the CPU's, and how far its normals are from the CPU's;
2. coupling pieces at global batches 256-4096: the float32 cost matrix on the GPU, its copy to the host, the
   exact solve (lapjv) on the host;
3. training images/s for the cifar10 and imagenet32 presets (fp32 and bf16), LOOM (pipelined, as ``fit``
   runs it) vs independent coupling, LOOM's overhead in %; and the host-device synchronisations the training
   thread makes per step when the coupling is not pipelined (the design allows one);
4. sampling images/s (euler-8, dopri5) with the cifar10 network, and Inception feature throughput (the
   TF-Inception architecture of torch-fidelity with random weights unless ``--inception-weights`` points at the
   real ones: nothing is downloaded).

Networks are randomly initialised: the numbers are speeds, not quality. Without CUDA it says so and exits 0.
Run: ``python benchmarks/gpu.py [--budget 420] [--inception-weights PATH]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from unittest import mock

import torch
from step_overhead import timed

from loomcfm_core.config import load_config
from loomcfm_core.coupling_solve import cost_matrix, solve, to_host
from loomcfm_core.noise import counters, noise_from_seeds, noise_words, normals, random_seeds
from loomcfm_core.sampling import solve as integrate
from loomcfm_core.training.pipelined import CouplingPlanner
from loomcfm_core.training.step import build_state, train_step


def noise_section(device: torch.device) -> None:
    shape, batch = (3, 32, 32), 128
    seeds = random_seeds(batch, torch.Generator().manual_seed(0))
    on_device = seeds.to(device)
    steps = counters(3 * 32 * 32 // 2, device)

    def per_sample():
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))
                            for s in seeds]).to(device)

    rows = [("noise_from_seeds, compiled (training's)", timed(lambda: noise_from_seeds(on_device, shape), 50, device)),
            ("noise_from_seeds, eager", timed(lambda: normals(on_device, steps, 3072), 50, device)),
            ("torch.randn (the floor)", timed(lambda: torch.randn(batch, *shape, device=device), 50, device)),
            ("per-sample CPU torch.Generator + copy", timed(per_sample, 5, device))]
    print(f"\n## noise for {batch} x 3 x 32 x 32\n\n| method | ms |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.3f} |")
    same = torch.equal(noise_words(on_device, steps).cpu(), noise_words(seeds, counters(1536, "cpu")))
    gap = (noise_from_seeds(on_device, shape).cpu() - noise_from_seeds(seeds, shape)).abs().max().item()
    print(f"\nGPU integer stream bit-identical to the CPU's: {'yes' if same else 'NO'}; "
          f"largest |GPU compiled - CPU| normal: {gap:.2e}")


def coupling_section(device: torch.device) -> None:
    print("\n## coupling pieces per problem (float32 cost matrix on the GPU, lapjv on the host)\n")
    print("| global batch | cost matrix ms | copy to host ms | lapjv ms |\n|---|---|---|---|")
    for n in (256, 512, 1024, 2048, 4096):
        x1 = torch.rand(n, 3, 32, 32, device=device) * 2 - 1
        x0 = noise_from_seeds(torch.arange(n, device=device), (3, 32, 32))
        matrix = timed(lambda: cost_matrix(x1, x0), 10, device)
        costs = cost_matrix(x1, x0)
        copy = timed(lambda: to_host(costs, x0), 5, device)
        host = to_host(costs)[0].numpy()
        start = time.perf_counter()
        solve(host, "lapjv")
        print(f"| {n} | {matrix:.2f} | {copy:.2f} | {(time.perf_counter() - start) * 1e3:.1f} |")


def _images_per_s(preset: str, kind: str, bf16: bool, device: torch.device) -> float:
    """Training throughput over whole coupling units (a problem of max_problem items spans several batches)."""
    cfg = load_config(preset, [f"coupling.kind={kind}", f"train.bf16={str(bf16).lower()}"])
    state = build_state(cfg, 50_000, device)
    batch = cfg.train.batch_size
    planner = CouplingPlanner(state.coupling, batch, checkpoint_every=10**9, total_steps=10**9, device=device)
    warmup, steps = planner.span, max(20, 2 * planner.span)
    order = torch.randperm(50_000, generator=torch.Generator().manual_seed(0))
    loader = [(torch.rand(batch, *cfg.flow_shape).pin_memory(), None, order[i * batch:(i + 1) * batch])
              for i in range(warmup + steps)]
    it = planner.batches(loader, 0)
    for _ in range(warmup):  # compilation, cuDNN autotuning, the allocator, the first (never overlapped) unit
        x1, index, assigned = next(it)
        train_step(state, x1.to(device, non_blocking=True), index, assigned)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for x1, index, assigned in it:
        train_step(state, x1.to(device, non_blocking=True), index, assigned)
    torch.cuda.synchronize(device)
    return steps * batch / (time.perf_counter() - start)


def syncs_per_step(device: torch.device, steps: int = 5) -> float:
    """Synchronising calls the training thread makes per unpipelined LOOM step (CUDA's sync debug mode)."""
    cfg = load_config("cifar10", ["coupling.max_problem=32"])
    state = build_state(cfg, 50_000, device)
    x1 = torch.rand(32, *cfg.flow_shape, device=device)
    train_step(state, x1, torch.arange(32))
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for step in range(steps):
                train_step(state, x1, torch.arange(32 * (step + 1), 32 * (step + 2)))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def training_section(device: torch.device, deadline: float) -> None:
    print("\n## training images/s (random data, batch = the preset's per-GPU batch)\n")
    print("| preset | precision | independent img/s | LOOM img/s | LOOM overhead |\n|---|---|---|---|---|")
    for preset in ("cifar10", "imagenet32"):
        for bf16 in (False, True):
            if time.monotonic() > deadline:
                print("| (time budget spent) | | | | |")
                return
            indep = _images_per_s(preset, "independent", bf16, device)
            loom = _images_per_s(preset, "loom", bf16, device)
            print(f"| {preset} | {'bf16' if bf16 else 'fp32'} | {indep:.0f} | {loom:.0f} | {indep / loom - 1:+.1%} |")
    print(f"\nhost-device synchronisations per unpipelined LOOM step (training thread): {syncs_per_step(device):.1f}")


def sampling_section(device: torch.device, weights: str | None) -> None:
    from loomcfm_core.models.loading import build_model

    cfg = load_config("cifar10")
    model = build_model(cfg).to(device).eval()
    print("\n## sampling (cifar10 network, random weights)\n\n| method | batch | NFE | images/s |\n|---|---|---|---|")
    for method, batch in (("euler-8", 256), ("dopri5-1", 64)):
        x0 = noise_from_seeds(torch.arange(batch, device=device), cfg.flow_shape)
        integrate(model, x0[:8], method)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        _, nfe = integrate(model, x0, method)
        torch.cuda.synchronize(device)
        print(f"| {method} | {batch} | {nfe} | {batch / (time.perf_counter() - start):.0f} |")
    print("\n## Inception features\n")
    from loomcfm_core.evaluation.metrics import InceptionFeatures

    if not weights:
        import torch_fidelity.feature_extractor_inceptionv3 as fe

        with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
                mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
            random_net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
        weights = str(Path(tempfile.mkdtemp()) / "random-inception.pth")
        torch.save(random_net.state_dict(), weights)
        label = "RANDOM weights (torch-fidelity's TF-Inception architecture; no --inception-weights given)"
    else:
        label = f"weights {weights}"
    network = InceptionFeatures(weights, device, 250)
    images = torch.randint(0, 256, (1000, 3, 32, 32), dtype=torch.uint8)
    network.features(images[:250])
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    network.features(images)
    torch.cuda.synchronize(device)
    print(f"{len(images) / (time.perf_counter() - start):.0f} images/s, batch 250, {label}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which no section starts")
    parser.add_argument("--inception-weights", default=None, help="TF-Inception weights (torch-fidelity format)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU here (torch.cuda.is_available() is False): nothing to measure; run this on a CUDA machine")
        return
    device = torch.device("cuda")
    deadline = time.monotonic() + args.budget
    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    sections = [("noise", lambda: noise_section(device)), ("coupling", lambda: coupling_section(device)),
                ("training", lambda: training_section(device, deadline)),
                ("sampling", lambda: sampling_section(device, args.inception_weights))]
    for name, section in sections:
        if time.monotonic() > deadline:
            print(f"\n(section {name} not started: the {args.budget:.0f} s budget is spent)")
            continue
        try:
            section()
        except Exception:  # noqa: BLE001 - one failing section must not hide the others
            print(f"\n(section {name} failed:)\n{traceback.format_exc()}")


if __name__ == "__main__":
    main()
