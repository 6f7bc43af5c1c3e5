"""Fréchet distances between generated and real images, on the features of a feature network.

Two feature networks, their weights from :mod:`loomcfm_core.evaluation.feature_weights`:

- ``inception``: the standard TF-Inception (``2015-12-05``) pool features, as torch-fidelity implements
  them (the same network clean-fid / EDM / torchcfm use), giving FID.
- ``classifier``: for the embedded digits, a small classifier trained at cache time and stored with the
  dataset; its distance is reported as ``fd_<dataset>``, never as FID.

Reference statistics of the training split are computed once per dataset and feature network and stored
beside the cache.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from loomcfm_core.data.dataset import ShardedDataset
from loomcfm_core.data.manifest import read_manifest
from loomcfm_core.errors import MetricsError, StorageError, UsageError
from loomcfm_core.models.classifier import DigitClassifier
from loomcfm_core.storage import join, storage_for


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
        raise UsageError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
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
            raise UsageError(f"expected uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
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
            raise UsageError(f"Inception scores 1- or 3-channel images, got {images.shape[1]} channels")
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


# ---- reference statistics --------------------------------------------------------------------------------

def dataset_images(dataset_uri: str, split: str, local_cache: str) -> torch.Tensor:
    """The stored uint8 images of a split, without flips."""
    dataset = ShardedDataset(dataset_uri, split, local_cache=local_cache)
    return torch.stack([torch.from_numpy(np.ascontiguousarray(dataset.read(i)[0])) for i in range(len(dataset))])


def reference_stats(dataset_uri: str, network: FeatureNetwork, local_cache: str) -> FeatureStats:
    """Train-split statistics for ``network``, computed once and stored beside the cache.

    Args:
        local_cache: the node-local folder a remote dataset's shards are copied to (``data.local_cache``).
    """
    if read_manifest(dataset_uri) is None:
        raise StorageError(f"{dataset_uri}: no manifest.json; run `loomcfm cache` first")
    uri = join(dataset_uri, f"ref-stats-{network.name}.npz")
    store = storage_for(uri)
    if store.exists(uri):
        with tempfile.TemporaryDirectory() as tmp:
            return FeatureStats.from_bytes(store.get(uri, Path(tmp) / "stats.npz").read_bytes())
    images = dataset_images(dataset_uri, "train", local_cache)
    stats = FeatureStats.of(network.features(images, desc="reference features"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stats.npz"
        path.write_bytes(stats.to_bytes())
        store.put(path, uri)
    return stats
