"""One function per pipeline stage: validated config in, URIs and numbers out.

The CLI, the KFP components and the Kubernetes Jobs all call these, so a stage behaves the same whichever
front door started it.
"""

from __future__ import annotations

from loomcfm_core import train as training
from loomcfm_core.config import Config
from loomcfm_core.data.cache import cache_dataset


def cache(cfg: Config) -> dict:
    """Cache ``cfg.data.source`` as HDF5 shards under the storage root (a no-op when already cached)."""
    result = cache_dataset(cfg)
    splits = result.manifest["splits"]
    return {"dataset_uri": result.uri, "created": result.created,
            "num_train": splits["train"]["count"], "num_val": splits["val"]["count"]}


def train(cfg: Config, dataset_uri: str | None = None, parent_run_id: str | None = None) -> dict:
    """Train on Ray Train; the dataset defaults to ``data.uri`` or this config's cache (built if missing)."""
    dataset_uri = dataset_uri or cfg.data.uri or cache_dataset(cfg).uri
    result = training.train(cfg, dataset_uri, parent_run_id)
    return {"run_uri": result.run_uri, "checkpoint_uri": result.checkpoint_uri, "dataset_uri": dataset_uri,
            **{k: v for k, v in result.metrics.items() if k not in ("checkpoint_uri",)}}
