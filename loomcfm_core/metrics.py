"""Fréchet distances between generated and real images, on a feature network loaded from storage.

Two feature networks:

- ``inception``: the standard TF-Inception (``2015-12-05``) pool features, as torch-fidelity implements
  them (the same network clean-fid / EDM / torchcfm use), giving FID. Its weights come from a configured
  path or storage URI and are checked by sha256 — never downloaded at run time (``loomcfm weights fetch``
  puts them into storage once, on a machine with internet access).
- ``classifier``: for the embedded digits, a small classifier trained at cache time and stored with the
  dataset; its distance is reported as ``fd_<dataset>``, never as FID.

Reference statistics of the training split are computed once per dataset and feature network and stored
beside the cache.
"""

from __future__ import annotations

import io
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from loomcfm_core.config import Config
from loomcfm_core.data.cache import read_manifest, sha256_file
from loomcfm_core.data.dataset import ShardedDataset
from loomcfm_core.models.classifier import DigitClassifier, train_classifier
from loomcfm_core.storage import StorageError, join, storage_for

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
CLASSIFIER_FILE = "classifier.pt"


class MetricsError(RuntimeError):
    """A feature network or reference statistics that cannot be used; says which file and what to do."""


# ---- the distance ----------------------------------------------------------------------------------------

@dataclass
class FeatureStats:
    mu: np.ndarray
    sigma: np.ndarray
    count: int

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStats:
        features = np.asarray(features, dtype=np.float64)
        return cls(features.mean(axis=0), np.cov(features, rowvar=False), len(features))

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, mu=self.mu, sigma=self.sigma, count=self.count)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> FeatureStats:
        arrays = np.load(io.BytesIO(data))
        return cls(arrays["mu"], arrays["sigma"], int(arrays["count"]))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2, which are real and
    non-negative for covariance matrices; this avoids ``sqrtm``'s complex round-off on near-singular inputs.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues.real, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


# ---- feature networks ------------------------------------------------------------------------------------

class FeatureNetwork:
    """Maps uint8 images [N, C, H, W] to feature vectors; ``name`` keys its reference statistics."""

    name = ""
    metric = ""

    def __init__(self, device: torch.device | str = "cpu", batch_size: int = 250) -> None:
        self.device, self.batch_size = torch.device(device), batch_size

    def _batch(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def features(self, images: torch.Tensor, desc: str = "features") -> np.ndarray:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        out = [self._batch(images[start:start + self.batch_size].to(self.device)).double().cpu()
               for start in tqdm(range(0, len(images), self.batch_size), desc=desc, unit="batch", leave=False,
                                 dynamic_ncols=True)]
        return torch.cat(out).numpy()


class InceptionFeatures(FeatureNetwork):
    """TF-Inception pool3 (2048-d) features through torch-fidelity, from a local weights file."""

    name = "inception-2015-12-05"
    metric = "fid"

    def __init__(self, weights_path: str | Path, device: torch.device | str = "cpu", batch_size: int = 250) -> None:
        super().__init__(device, batch_size)
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                   feature_extractor_weights_path=str(weights_path))
        except (RuntimeError, KeyError, OSError) as exc:
            raise MetricsError(f"{weights_path}: not TF-Inception weights in torch-fidelity's format ({exc})") from exc
        self.net.to(self.device)

    def _batch(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[1] != 3:
            raise ValueError(f"Inception scores 1- or 3-channel images, got {images.shape[1]} channels")
        return self.net(images)[0]  # resizes to 299x299 itself, as TF's graph does


class ClassifierFeatures(FeatureNetwork):
    def __init__(self, classifier: DigitClassifier, dataset_name: str, device: torch.device | str = "cpu",
                 batch_size: int = 500) -> None:
        super().__init__(device, batch_size)
        self.net = classifier.to(self.device).eval()
        self.name = "classifier"
        self.metric = f"fd_{dataset_name}"

    def _batch(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(images.float() / 127.5 - 1.0)


# ---- weights and classifier in storage -------------------------------------------------------------------

def _expected_sha256(cfg: Config, uri: str) -> str:
    if cfg.eval.inception_sha256:
        return cfg.eval.inception_sha256.lower()
    sidecar = uri + ".sha256"
    if storage_for(sidecar).exists(sidecar):
        return storage_for(sidecar).read_text(sidecar).split()[0].lower()
    raise MetricsError(f"eval.inception_weights={uri}: no hash to check it against; set eval.inception_sha256 "
                       f"or keep the {sidecar} that `loomcfm weights fetch` writes")


def inception_weights(cfg: Config) -> Path:
    """A verified local copy of the configured Inception weights."""
    uri = cfg.eval.inception_weights
    if not uri:
        raise MetricsError("eval.inception_weights is not set: FID needs the TF-Inception weights at a path or "
                           "storage URI (`loomcfm weights fetch --to URI` downloads them once)")
    store = storage_for(uri)
    if not store.exists(uri):
        raise MetricsError(f"eval.inception_weights={uri}: file not found (`loomcfm weights fetch --to {uri}` "
                           "downloads it on a machine with internet access)")
    expected = _expected_sha256(cfg, uri)
    local = Path(cfg.data.local_cache).expanduser() / "weights" / f"inception-{expected[:16]}.pth"
    if not (local.is_file() and sha256_file(local).startswith(expected)):
        store.get(uri, local)
        actual = sha256_file(local)
        if not actual.startswith(expected):
            local.unlink()
            raise MetricsError(f"eval.inception_weights={uri}: sha256 {actual} does not match the expected "
                               f"{expected}; the file is corrupt or not the pt_inception-2015-12-05 weights")
    return local


def fetch_inception_weights(to_uri: str) -> str:
    """Download the standard Inception weights once into storage, with a ``.sha256`` sidecar.

    For clusters with internet access; tests and the embedded run never call this.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inception.pth"
        with urllib.request.urlopen(INCEPTION_URL, timeout=120) as response, open(path, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        digest = sha256_file(path)
        storage_for(to_uri).put(path, to_uri)
        storage_for(to_uri).write_text(to_uri + ".sha256", f"{digest}  {INCEPTION_URL}\n")
    return digest


def classifier_uri(dataset_uri: str) -> str:
    return join(dataset_uri, CLASSIFIER_FILE)


def train_dataset_classifier(dataset_uri: str, local_cache: str, seed: int = 0) -> dict:
    """Train the digits classifier on the train split, store it beside the dataset, return its accuracy."""
    train = ShardedDataset(dataset_uri, "train", local_cache=local_cache)
    val = ShardedDataset(dataset_uri, "val", local_cache=local_cache)
    images = torch.stack([train[i][0] for i in range(len(train))])
    model = train_classifier(images, torch.from_numpy(train.labels), seed=seed)
    with torch.no_grad():
        val_images = torch.stack([val[i][0] for i in range(len(val))])
        accuracy = (model(val_images).argmax(1).numpy() == val.labels).mean().item()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CLASSIFIER_FILE
        torch.save({"state_dict": model.state_dict(), "in_channels": images.shape[1],
                    "resolution": images.shape[-1], "num_classes": model.head.out_features,
                    "val_accuracy": accuracy}, path)
        storage_for(dataset_uri).put(path, classifier_uri(dataset_uri))
    return {"classifier_val_accuracy": accuracy}


def load_classifier(dataset_uri: str) -> DigitClassifier:
    uri = classifier_uri(dataset_uri)
    if not storage_for(uri).exists(uri):
        raise MetricsError(f"{uri} not found: the classifier for fd_<dataset> is trained by `loomcfm cache`")
    with tempfile.TemporaryDirectory() as tmp:
        saved = torch.load(storage_for(uri).get(uri, Path(tmp) / CLASSIFIER_FILE), weights_only=False)
    model = DigitClassifier(saved["in_channels"], saved["num_classes"])
    model(torch.zeros(1, saved["in_channels"], saved["resolution"], saved["resolution"]))  # lazy layer
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def feature_network(cfg: Config, dataset_uri: str, device: torch.device | str = "cpu") -> FeatureNetwork:
    """The configured network: ``auto`` is the classifier for the built-in digits, Inception otherwise."""
    kind = cfg.eval.feature_network
    if kind == "auto":
        kind = "classifier" if cfg.data.source == "builtin:digits" else "inception"
    if kind == "classifier":
        return ClassifierFeatures(load_classifier(dataset_uri), cfg.data.name, device)
    return InceptionFeatures(inception_weights(cfg), device, cfg.eval.batch_size)


# ---- reference statistics --------------------------------------------------------------------------------

def dataset_images(dataset_uri: str, split: str, local_cache: str) -> torch.Tensor:
    """The stored uint8 images of a split, without flips."""
    dataset = ShardedDataset(dataset_uri, split, local_cache=local_cache)
    return torch.stack([torch.from_numpy(np.ascontiguousarray(dataset.read(i)[0])) for i in range(len(dataset))])


def reference_stats(cfg: Config, dataset_uri: str, network: FeatureNetwork) -> FeatureStats:
    """Train-split statistics for ``network``, computed once and stored beside the cache."""
    if read_manifest(dataset_uri) is None:
        raise StorageError(f"{dataset_uri}: no manifest.json; run `loomcfm cache` first")
    uri = join(dataset_uri, f"ref-stats-{network.name}.npz")
    store = storage_for(uri)
    if store.exists(uri):
        with tempfile.TemporaryDirectory() as tmp:
            return FeatureStats.from_bytes(store.get(uri, Path(tmp) / "stats.npz").read_bytes())
    images = dataset_images(dataset_uri, "train", cfg.data.local_cache)
    stats = FeatureStats.of(network.features(images, desc="reference features"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stats.npz"
        path.write_bytes(stats.to_bytes())
        store.put(path, uri)
    return stats
