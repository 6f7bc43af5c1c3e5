"""Reflow pairs in the reference implementation's layout: cached by a ``pairs:`` (or ``hdf5:``) source and
trained on with the ``pairs`` coupling, which serves the stored noise arrays.

The files are written with plain h5py following the reference's writer as described in
/work/notes/reference-formats-spec.md §1.3 (Araachie/loom-cfm @213f24f, ``dataset/h5.py:HDF5Maker`` and
``generate_pairs.py:main``): ``shard_%04d.hdf5`` from 0001, one group per pair named by its index within the
shard, ``source`` = the float32 noise (C,H,W), ``target`` = ``floor(127.5·(clamp(x)+1))`` stored as float32
(C,H,W), both lzf-compressed, no attributes; a count that fills the last shard leaves an empty shard after it.
"""

import h5py
import numpy as np
import pytest
import torch

from loomcfm_core import coupling as coupling_module
from loomcfm_core.config import load_config
from loomcfm_core.data.cache import cache_dataset
from loomcfm_core.data.dataset import ShardedDataset
from loomcfm_core.data.sources import SourceError
from loomcfm_core.training.loop import fit
from tests.conftest import SMALL

SHAPE = (1, 8, 8)


def write_reference_pairs(folder, n, per_shard, seed=0, shape=SHAPE):
    """What ``generate_pairs.py --output <folder>`` leaves; returns the (noise, levels) arrays in item order."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    noise = rng.standard_normal((n, *shape)).astype(np.float32)
    sample = rng.uniform(-1.2, 1.2, (n, *shape)).astype(np.float32)  # a little outside [-1, 1]: the clamp acts
    levels = np.trunc((np.clip(sample, -1, 1) + 1) / 2 * 255).astype(np.float32)
    handles = {}
    for i in range(n):
        shard = i // per_shard + 1
        if shard not in handles:
            handles[shard] = h5py.File(folder / f"shard_{shard:04d}.hdf5", "w")
        group = handles[shard].create_group(str(i % per_shard))
        group.create_dataset("source", data=noise[i], compression="lzf")
        group.create_dataset("target", data=levels[i], compression="lzf")
        if (i + 1) % per_shard == 0:  # the reference opens the next shard as soon as one is full
            handles[shard + 1] = h5py.File(folder / f"shard_{shard + 1:04d}.hdf5", "w")
    for fh in handles.values():
        fh.close()
    return noise, levels


def _cfg(tmp_path, source, *extra):
    return load_config("digits", [*SMALL, f"data.source={source}", "data.name=refpairs", "data.shard_size=7",
                                  f"storage.root={tmp_path / 'store'}", *extra])


@pytest.mark.parametrize("n", [25, 20])  # 20: the reference leaves an empty shard_0003.hdf5
def test_reference_pairs_cache_with_their_noise_and_levels(tmp_path, n):
    noise, levels = write_reference_pairs(tmp_path / "ref" / "train", n, per_shard=10)
    assert len(list((tmp_path / "ref" / "train").glob("*.hdf5"))) == 3
    cached = cache_dataset(_cfg(tmp_path, f"pairs:{tmp_path / 'ref'}"))
    manifest = cached.manifest
    assert manifest["kind"] == "pairs" and list(manifest["splits"]) == ["train"]
    assert manifest["arrays"] == {"target": "uint8", "noise": "float32"} and manifest["target_dtype"] == "uint8"
    assert manifest["splits"]["train"]["count"] == n
    pairs = ShardedDataset(cached.uri)
    assert pairs.is_pairs and pairs.stored_noise and pairs.pair_seeds is None and len(pairs) == n
    everything = torch.arange(n)
    assert torch.equal(pairs.pair_noise(everything), torch.from_numpy(noise)), "the stored arrays, bit for bit"
    served = torch.stack([pairs[i][0] for i in range(n)])
    assert torch.equal(served, torch.from_numpy(levels) / 127.5 - 1), "the reference's PairedDataset values"
    # the shard folder itself, and hdf5: over the data_root, are the same pairs
    assert cache_dataset(_cfg(tmp_path, f"pairs:{tmp_path / 'ref' / 'train'}")).manifest["kind"] == "pairs"
    via_hdf5 = ShardedDataset(cache_dataset(_cfg(tmp_path, f"hdf5:{tmp_path / 'ref'}")).uri)
    assert torch.equal(via_hdf5.pair_noise(everything), torch.from_numpy(noise))


def test_training_on_reference_pairs_serves_the_stored_noise(tmp_path, monkeypatch):
    noise, levels = write_reference_pairs(tmp_path / "ref" / "train", 40, per_shard=16)
    uri = cache_dataset(_cfg(tmp_path, f"pairs:{tmp_path / 'ref'}")).uri
    served = []
    original = coupling_module.PairsCoupling.couple

    def recording(self, x1, index, gather=None, broadcast=None):
        x0, stats = original(self, x1, index, gather, broadcast)
        served.append((index.clone(), x1.clone(), x0.clone()))
        return x0, stats

    monkeypatch.setattr(coupling_module.PairsCoupling, "couple", recording)
    cfg = _cfg(tmp_path, "builtin:digits", "coupling.kind=pairs", f"data.uri={uri}", "train.max_steps=4", "train.log_every=2")
    summary = fit(cfg, uri, f"{tmp_path}/store/runs/reflow", torch.device("cpu"))
    assert summary.step == 4 and np.isfinite(summary.metrics["train/loss"])
    assert len(served) == 4
    for index, x1, x0 in served:
        assert torch.equal(x0, torch.from_numpy(noise[index.numpy()])), "the noise trained with is the stored one"
        assert torch.equal(x1, torch.from_numpy(levels[index.numpy()]) / 127.5 - 1)


def test_bad_reference_pairs_name_the_file_and_what_is_expected(tmp_path):
    write_reference_pairs(tmp_path / "ref", 4, per_shard=10)
    with h5py.File(tmp_path / "ref" / "shard_0001.hdf5", "a") as fh:
        fh["2/target"][0, 0, 0] = 12.5
    with pytest.raises(SourceError, match=r"shard_0001.hdf5:2: 'target' must hold integer pixel levels 0..255"):
        cache_dataset(_cfg(tmp_path, f"pairs:{tmp_path / 'ref'}"))
    write_reference_pairs(tmp_path / "rgb", 4, per_shard=10, shape=(3, 8, 8))
    with pytest.raises(SourceError, match=r"'source' has shape \(3, 8, 8\) \(C,H,W\), expected \(1, 8, 8\) from "
                                          "data.channels and data.resolution"):
        cache_dataset(_cfg(tmp_path, f"pairs:{tmp_path / 'rgb'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no reference pair shards in"):
        cache_dataset(_cfg(tmp_path, f"pairs:{tmp_path / 'empty'}"))
