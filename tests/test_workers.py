"""Sampling on several workers: the same seeds give the same pairs and the same scores as one worker."""

from pathlib import Path

import numpy as np
import pytest
import torch

from loomcfm_core.checkpoint import save_checkpoint
from loomcfm_core.config import load_config
from loomcfm_core.data.dataset import ShardedDataset
from loomcfm_core.evaluation.scoring import evaluate
from loomcfm_core.models.loading import build_model
from loomcfm_core.reflow import generate_pairs
from loomcfm_core.workers import worker_ranges
from tests.conftest import SMALL


def test_workers_get_contiguous_runs_of_whole_batches():
    assert worker_ranges(20, 6, 2) == [range(0, 12), range(12, 20)]
    assert worker_ranges(20, 6, 1) == [range(0, 20)]
    assert worker_ranges(5, 6, 3) == [range(0, 5)], "no worker without a batch"
    ranges = worker_ranges(1000, 7, 5)
    assert [r.start for r in ranges[1:]] == [r.stop for r in ranges[:-1]] and ranges[-1].stop == 1000
    assert all(r.start % 7 == 0 for r in ranges)


@pytest.fixture()
def one_thread():
    """Ray runs a task with ``num_cpus=1`` on one thread (OMP_NUM_THREADS=1); the in-process worker does the
    same, so both use the same kernels and the comparison can be exact."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.ray
def test_two_ray_workers_equal_one_worker(tmp_path, store, one_thread):
    common = [*SMALL, "reflow.num_pairs=20", "reflow.method=euler-2",
              "sample.batch_size=6", "data.shard_size=8", "eval.num_samples=30", "eval.batch_size=8",
              "eval.methods=[euler-1,midpoint-1]", "ray.cpus_per_worker=1"]
    one = load_config("digits", [*common, f"storage.root={store}"])
    two = load_config("digits", [*common, f"storage.root={tmp_path}/two", "ray.num_workers=2"])
    dataset_uri = str(next((store / "datasets").iterdir()))  # the session's, with its classifier
    torch.manual_seed(0)
    model = build_model(one).eval()
    for p in model.out.parameters():  # a network that does not output zeros everywhere
        torch.nn.init.normal_(p, std=0.1)
    ckpt = save_checkpoint({"ema": model.state_dict()}, f"{tmp_path}/store/runs/r", step=1, keep=1)

    uri_one, manifest_one = generate_pairs(one, ckpt)
    uri_two, manifest_two = generate_pairs(two, ckpt)
    assert Path(uri_two).name == Path(uri_one).name, "content-addressed: the number of workers is not in the key"
    one_pairs = {i: np.asarray(a) for i, a in enumerate(_items(tmp_path, uri_one, manifest_one))}
    parts = {Path(s["path"]).name.split("-shard")[0] for s in manifest_two["splits"]["train"]["shards"]}
    assert parts == {"part-000", "part-001"}, "each worker wrote its own shards"
    two_pairs = {i: np.asarray(a) for i, a in enumerate(_items(tmp_path, uri_two, manifest_two))}
    assert one_pairs.keys() == two_pairs.keys() and len(one_pairs) == 20
    for i in one_pairs:
        assert np.array_equal(one_pairs[i], two_pairs[i]), i

    (tmp_path / "e1").mkdir()
    (tmp_path / "e2").mkdir()
    a = evaluate(one, ckpt, dataset_uri, tmp_path / "e1", output_uri=f"{tmp_path}/out1")
    b = evaluate(two, ckpt, dataset_uri, tmp_path / "e2", output_uri=f"{tmp_path}/out2")
    assert [(r.method, r.nfe, r.distance) for r in a.rows] == [(r.method, r.nfe, r.distance) for r in b.rows]
    assert [r.nfe for r in a.rows] == [1.0, 2.0] and all(np.isfinite(r.distance) for r in a.rows)
    assert (tmp_path / "e1" / "samples_euler-1.png").read_bytes() == (tmp_path / "e2" / "samples_euler-1.png").read_bytes()


def _items(tmp_path, uri, manifest):
    dataset = ShardedDataset(uri, local_cache=str(tmp_path / "node"))
    assert dataset.num_images == manifest["splits"]["train"]["count"]
    return [np.concatenate([dataset[i][0].numpy().ravel(), [float(dataset.pair_seeds[i])]])
            for i in range(len(dataset))]
