"""The feature networks' weights: the TF-Inception weights in storage, checked by sha256 and never downloaded
at run time, and the digits classifier trained at cache time and stored with the dataset.

``loomcfm weights fetch`` puts the Inception weights into storage once, on a machine with internet access;
every run after that reads them from the configured path or URI.
"""

from __future__ import annotations

import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

from loomcfm_core.checksums import expected_sha256, fetch_verified, sha256_file
from loomcfm_core.data.dataset import ShardedDataset
from loomcfm_core.errors import MetricsError
from loomcfm_core.models.classifier import DigitClassifier, train_classifier
from loomcfm_core.storage import join, storage_for

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
CLASSIFIER_FILE = "classifier.pt"


# ---- Inception weights -----------------------------------------------------------------------------------

def inception_weights(uri: str | None, sha256: str | None, local_cache: str) -> Path:
    """A verified local copy of the Inception weights.

    Args:
        uri: where they are (``eval.inception_weights``).
        sha256: their expected sha256 or a prefix of it (``eval.inception_sha256``); None: the ``.sha256``
            file beside them.
        local_cache: the node-local folder the copy goes to (``data.local_cache``), kept for the next run.
    """
    if not uri:
        raise MetricsError("eval.inception_weights is not set: FID needs the TF-Inception weights at a path or "
                           "storage URI (`loomcfm weights fetch --to URI` downloads them once); or score with the "
                           "classifier trained on the dataset's labels: --set eval.feature_network=classifier")
    if not storage_for(uri).exists(uri):
        raise MetricsError(f"eval.inception_weights={uri}: file not found (`loomcfm weights fetch --to {uri}` "
                           "downloads it on a machine with internet access)")
    expected = expected_sha256(uri, sha256, name=f"eval.inception_weights={uri}",
                               key="eval.inception_sha256", hint=" that `loomcfm weights fetch` writes",
                               error=MetricsError)
    local = Path(local_cache).expanduser() / "weights" / f"inception-{expected[:16]}.pth"
    return fetch_verified(uri, local, expected, name=f"eval.inception_weights={uri}", error=MetricsError,
                          hint="the file is corrupt or not the pt_inception-2015-12-05 weights")


def fetch_inception_weights(to_uri: str) -> str:
    """Download the standard Inception weights once into storage, with a ``.sha256`` sidecar.

    For clusters with internet access; tests and the embedded run never call this.

    Returns:
        The weights' sha256, which :func:`inception_weights` checks every later copy against.
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


# ---- the digits classifier -------------------------------------------------------------------------------

def classifier_uri(dataset_uri: str) -> str:
    return join(dataset_uri, CLASSIFIER_FILE)


def train_dataset_classifier(dataset_uri: str, local_cache: str, seed: int = 0) -> float:
    """Train the digits classifier on the train split and store it beside the dataset.

    Returns:
        Its accuracy on the val split (the cache stage logs it: a poor classifier makes a poor metric).
    """
    train = ShardedDataset(dataset_uri, "train", local_cache=local_cache)
    classes = np.unique(train.labels)
    if len(classes) < 2:
        raise MetricsError(f"eval.feature_network=classifier: {dataset_uri} has {len(classes)} class, and a "
                           "classifier of one class has no features to compare; for FID set "
                           "eval.feature_network=inception and eval.inception_weights=<path or URI of the "
                           "TF-Inception weights> (`loomcfm weights fetch --to URI` downloads them once)")
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
    return accuracy


def load_classifier(dataset_uri: str) -> DigitClassifier:
    """The classifier ``cache`` stored beside the dataset, ready to compute features."""
    uri = classifier_uri(dataset_uri)
    if not storage_for(uri).exists(uri):
        raise MetricsError(f"{uri} not found: the classifier for fd_<dataset> is trained by `loomcfm cache`")
    with tempfile.TemporaryDirectory() as tmp:
        saved = torch.load(storage_for(uri).get(uri, Path(tmp) / CLASSIFIER_FILE), weights_only=False)
    model = DigitClassifier(saved["in_channels"], saved["num_classes"])
    model(torch.zeros(1, saved["in_channels"], saved["resolution"], saved["resolution"]))  # lazy layer
    model.load_state_dict(saved["state_dict"])
    return model.eval()
