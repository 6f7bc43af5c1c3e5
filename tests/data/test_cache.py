"""Every source round-trips through the HDF5 cache; bad inputs fail with one clear error."""

import json
import pickle

import boto3
import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from loomcfm_core.cli import main
from loomcfm_core.config import load_config
from loomcfm_core.data import cache as cache_module
from loomcfm_core.data.cache import cache_dataset
from loomcfm_core.data.manifest import read_manifest
from loomcfm_core.data.dataset import ShardedDataset
from loomcfm_core.data.sources import SourceError
from loomcfm_core.storage import StorageError

RNG = np.random.default_rng(0)


def _images(n, c, res):
    return RNG.integers(0, 256, size=(n, c, res, res), dtype=np.uint8)


def _cfg(tmp_path, source, channels=3, resolution=8, **extra):
    sets = [f"data.source={source}", f"data.channels={channels}", f"data.resolution={resolution}",
            "data.shard_size=4", f"storage.root={tmp_path / 'store'}", "data.name=t",
            "model.channel_mult=[1]", "model.attn_resolutions=[]"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config("digits", sets)


def _read_back(uri, split):
    ds = ShardedDataset(uri, split)
    items = [ds.read(i) for i in range(len(ds))]
    return np.stack([im for im, _ in items]), np.array([lab for _, lab in items])


def _assert_round_trip(cfg, expected):
    result = cache_dataset(cfg)
    assert result.created
    for split, (images, labels) in expected.items():
        got_images, got_labels = _read_back(result.uri, split)
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)
        assert result.manifest["splits"][split]["count"] == len(images)
    return result


def write_imagefolder(root, splits):
    for split, (images, labels) in splits.items():
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i:04d}.png")


def test_imagefolder_round_trip(tmp_path):
    splits = {}
    for split, n in (("train", 9), ("val", 5)):
        labels = np.sort(RNG.integers(0, 3, size=n))
        labels[0], labels[-1] = 0, 2
        splits[split] = (_images(n, 3, 8), labels)
    write_imagefolder(tmp_path / "folder", splits)
    # files are read class by class, in name order: the expected order is the one we wrote
    result = _assert_round_trip(_cfg(tmp_path, f"imagefolder:{tmp_path / 'folder'}"), splits)
    assert len(result.manifest["splits"]["train"]["shards"]) == 3


def _pickle(path, data, labels, byte_keys):
    batch = {b"data": data, b"labels": list(labels)} if byte_keys else {"data": data, "labels": list(labels)}
    path.write_bytes(pickle.dumps(batch))


def write_cifar(root, train, val):
    root.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(np.arange(len(train[0])), 5), start=1):
        _pickle(root / f"data_batch_{i}", train[0][part].reshape(len(part), -1), train[1][part], True)
    _pickle(root / "test_batch", val[0].reshape(len(val[0]), -1), val[1], True)


def test_cifar10_round_trip(tmp_path):
    train = (_images(11, 3, 32), RNG.integers(0, 10, size=11))
    val = (_images(3, 3, 32), RNG.integers(0, 10, size=3))
    write_cifar(tmp_path / "cifar-10-batches-py", train, val)
    _assert_round_trip(_cfg(tmp_path, f"cifar10:{tmp_path / 'cifar-10-batches-py'}", resolution=32),
                       {"train": train, "val": val})


def test_imagenet32_round_trip(tmp_path):
    root = tmp_path / "imagenet32"
    root.mkdir()
    train = (_images(7, 3, 32), RNG.integers(1, 1001, size=7))
    val = (_images(2, 3, 32), RNG.integers(1, 1001, size=2))
    for i, part in enumerate((slice(0, 2), slice(2, 7)), start=1):
        _pickle(root / f"train_data_batch_{i}", train[0][part].reshape(-1, 3072), train[1][part], False)
    _pickle(root / "val_data", val[0].reshape(-1, 3072), val[1], False)
    # labels are 1..1000 on disk, 0..999 in the cache
    _assert_round_trip(_cfg(tmp_path, f"imagenet32:{root}", resolution=32),
                       {"train": (train[0], train[1] - 1), "val": (val[0], val[1] - 1)})


def test_imagenet32_reads_the_reference_train_val_layout(tmp_path):
    """The reference's ``data_root``: ``train/train_data_batch_*`` and ``val/val_data`` (spec §4.1)."""
    root = tmp_path / "imagenet32"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    train = (_images(5, 3, 32), RNG.integers(1, 1001, size=5))
    val = (_images(3, 3, 32), RNG.integers(1, 1001, size=3))
    for i, part in enumerate((slice(0, 3), slice(3, 5)), start=1):
        _pickle(root / "train" / f"train_data_batch_{i}", train[0][part].reshape(-1, 3072), train[1][part], False)
    _pickle(root / "val" / "val_data", val[0].reshape(-1, 3072), val[1], False)
    _assert_round_trip(_cfg(tmp_path, f"imagenet32:{root}", resolution=32),
                       {"train": (train[0], train[1] - 1), "val": (val[0], val[1] - 1)})
    _pickle(root / "val_data", val[0].reshape(-1, 3072), val[1], False)
    with pytest.raises(SourceError, match="holds both layouts"):
        cache_dataset(_cfg(tmp_path, f"imagenet32:{root}", resolution=32))
    (root / "val_data").unlink()
    (root / "val" / "val_data").unlink()
    with pytest.raises(SourceError, match=r"lacks val/val_data \(expected train_data_batch_<i> files"):
        cache_dataset(_cfg(tmp_path, f"imagenet32:{root}", resolution=32))


def test_hdf5_round_trip_both_layouts(tmp_path):
    root = tmp_path / "h5"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    train = (_images(6, 3, 8), RNG.integers(0, 5, size=6))
    val = (_images(3, 3, 8), RNG.integers(0, 5, size=3))
    with h5py.File(root / "train" / "a.h5", "w") as fh:  # our layout
        fh["images"], fh["labels"] = train[0], train[1]
    with h5py.File(root / "val" / "shard_0001.hdf5", "w") as fh:  # the reference's: a group per item, HWC
        for i in range(3):
            group = fh.create_group(str(i))
            group.create_dataset("image", data=val[0][i].transpose(1, 2, 0), compression="lzf")
            group.attrs["label"] = val[1][i]
    _assert_round_trip(_cfg(tmp_path, f"hdf5:{root}"), {"train": train, "val": val})


def test_digits_cache_then_noop(tmp_path, caplog):
    caplog.set_level("INFO")
    cfg = load_config("digits", [f"storage.root={tmp_path / 'store'}"])
    first = cache_dataset(cfg)
    assert first.created and first.manifest["splits"]["train"]["count"] == 1500
    assert first.manifest["splits"]["val"]["count"] == 297 and first.manifest["shape"] == [1, 8, 8]
    manifest_path = tmp_path / "store" / "datasets" / first.uri.rsplit("/", 1)[-1] / "manifest.json"
    stamp = manifest_path.stat().st_mtime_ns
    second = cache_dataset(cfg)
    assert not second.created and second.uri == first.uri and manifest_path.stat().st_mtime_ns == stamp
    assert "already cached" in caplog.text
    images, labels = _read_back(first.uri, "train")
    assert images.dtype == np.uint8 and images.max() == 255 and set(labels) == set(range(10))


def test_cli_cache_to_s3(tmp_path, s3_bucket, capsys):
    # Inception features: nothing to train at cache time (the digits classifier is tests/evaluation's)
    sets = ["--set", f"storage.root=s3://{s3_bucket}/prefix", "--set", "eval.feature_network=inception"]
    assert main(["cache", *sets]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dataset_uri"].startswith(f"s3://{s3_bucket}/prefix/datasets/digits-") and out["created"]
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]]
    name = out["dataset_uri"].rsplit("/", 1)[-1]
    assert f"prefix/datasets/{name}/manifest.json" in keys
    assert f"prefix/datasets/{name}/train/shard-00000.h5" in keys
    assert not [k for k in keys if ".tmp-" in k]
    assert main(["cache", *sets]) == 0
    assert json.loads(capsys.readouterr().out)["created"] is False

    # a node reads from a verified local copy; a corrupted object is refused
    local_cache = tmp_path / "node"
    ds = ShardedDataset(out["dataset_uri"], "val", local_cache=str(local_cache))
    assert len(ds) == 297 and ds[0][0].shape == (1, 8, 8)
    assert (local_cache / "datasets" / name / "val" / "shard-00000.h5").is_file()
    boto3.client("s3").put_object(Bucket=s3_bucket, Key=f"prefix/datasets/{name}/val/shard-00000.h5", Body=b"x")
    (local_cache / "datasets" / name / "val" / "shard-00000.h5").write_bytes(b"stale")
    with pytest.raises(StorageError, match=r"val/shard-00000.h5: size mismatch: 1 bytes, expected \d+"):
        ShardedDataset(out["dataset_uri"], "val", local_cache=str(local_cache))


def test_failure_midway_leaves_no_manifest_and_is_redone(tmp_path, monkeypatch):
    cfg = load_config("digits", [f"storage.root={tmp_path / 'store'}", "data.shard_size=500"])
    real_flush = cache_module.ShardWriter._flush
    calls = []

    def flaky_flush(self):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("node lost mid-write")
        real_flush(self)

    with monkeypatch.context() as patch:
        patch.setattr(cache_module.ShardWriter, "_flush", flaky_flush)
        with pytest.raises(OSError, match="node lost"):
            cache_dataset(cfg)
    uri = cache_module.dataset_uri(cfg, cache_module.cache_key(cfg.data, cache_module.open_source(cfg.data)))
    assert read_manifest(uri) is None
    assert list((tmp_path / "store" / "datasets").rglob("*.h5")), "some shards were written before the failure"
    redone = cache_dataset(cfg)
    assert redone.created and redone.uri == uri and read_manifest(uri)["splits"]["train"]["count"] == 1500


def test_hflip_doubles_and_mirrors(tmp_path):
    cfg = load_config("digits", [f"storage.root={tmp_path / 'store'}"])
    uri = cache_dataset(cfg).uri
    plain, flipped = ShardedDataset(uri, "train"), ShardedDataset(uri, "train", hflip=True)
    n = len(plain)
    assert len(flipped) == 2 * n
    image, label, index = flipped[n + 5]
    assert index == n + 5 and label == plain[5][1]
    torch.testing.assert_close(image, plain[5][0].flip(-1))
    assert image.min() >= -1 and image.max() <= 1
    with pytest.raises(IndexError):
        flipped[2 * n]


def test_dataloader_workers(tmp_path):
    cfg = load_config("digits", [f"storage.root={tmp_path / 'store'}"])
    ds = ShardedDataset(cache_dataset(cfg).uri, "train", hflip=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=2, shuffle=True)
    seen = torch.cat([idx for _, _, idx in loader])
    assert sorted(seen.tolist()) == list(range(len(ds)))


# ---- bad inputs: one clear error each -------------------------------------------------------------------

def test_truncated_pickle(tmp_path):
    train = (_images(10, 3, 32), RNG.integers(0, 10, size=10))
    write_cifar(tmp_path / "c", train, (_images(2, 3, 32), np.zeros(2, int)))
    path = tmp_path / "c" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SourceError, match=r"data_batch_3: truncated or corrupt pickle"):
        cache_dataset(_cfg(tmp_path, f"cifar10:{tmp_path / 'c'}", resolution=32))


def test_missing_cifar_file(tmp_path):
    write_cifar(tmp_path / "c", (_images(10, 3, 32), np.zeros(10, int)), (_images(2, 3, 32), np.zeros(2, int)))
    (tmp_path / "c" / "test_batch").unlink()
    with pytest.raises(SourceError, match="lacks test_batch"):
        cache_dataset(_cfg(tmp_path, f"cifar10:{tmp_path / 'c'}", resolution=32))


def test_wrong_shape(tmp_path):
    root = tmp_path / "i"
    root.mkdir()
    _pickle(root / "train_data_batch_1", _images(2, 3, 64).reshape(2, -1), [1, 2], False)
    _pickle(root / "val_data", _images(2, 3, 64).reshape(2, -1), [1, 2], False)
    with pytest.raises(SourceError, match=r"expected \(N, 3072\).*data.resolution=64"):
        cache_dataset(_cfg(tmp_path, f"imagenet32:{root}", resolution=32))


def test_unreadable_image(tmp_path):
    write_imagefolder(tmp_path / "f", {"train": (_images(2, 3, 8), [0, 1]), "val": (_images(1, 3, 8), [0])})
    (tmp_path / "f" / "train" / "class_0" / "zz_broken.png").write_bytes(b"not a png")
    with pytest.raises(SourceError, match="zz_broken.png: cannot decode image"):
        cache_dataset(_cfg(tmp_path, f"imagefolder:{tmp_path / 'f'}"))


def test_empty_folder(tmp_path):
    (tmp_path / "f" / "train" / "a").mkdir(parents=True)
    (tmp_path / "f" / "val" / "a").mkdir(parents=True)
    with pytest.raises(SourceError, match="train contains no images"):
        cache_dataset(_cfg(tmp_path, f"imagefolder:{tmp_path / 'f'}"))


def test_image_size_mismatch_and_resize(tmp_path):
    write_imagefolder(tmp_path / "f", {"train": (_images(2, 3, 12), [0, 1]), "val": (_images(1, 3, 12), [0])})
    with pytest.raises(SourceError, match="image is 12x12, expected 8x8"):
        cache_dataset(_cfg(tmp_path, f"imagefolder:{tmp_path / 'f'}"))
    result = cache_dataset(_cfg(tmp_path, f"imagefolder:{tmp_path / 'f'}", **{"data.resize": "true"}))
    assert result.manifest["shape"] == [3, 8, 8] and result.manifest["splits"]["train"]["count"] == 2


def test_missing_dataset(tmp_path):
    with pytest.raises(StorageError, match="run `loomcfm cache` first"):
        ShardedDataset(str(tmp_path / "nothing"))


def test_cli_reports_source_error(tmp_path, capsys):
    assert main(["cache", "--set", f"data.source=cifar10:{tmp_path}/none", "--set", "data.channels=3",
                 "--set", "data.resolution=32", "--set", "model.attn_resolutions=[16]"]) == 1
    assert "is not a folder" in capsys.readouterr().err
    assert main(["cache", "--set", "train.lr=oops"]) == 2
    assert "train.lr" in capsys.readouterr().err
