"""One function per pipeline stage: validated config in, URIs and numbers out.

The CLI, the KFP components and the Kubernetes Jobs all call these, so a stage behaves the same whichever
front door started it.
"""

from __future__ import annotations

from loomcfm_core.config import Config
from loomcfm_core.data.cache import cache_dataset


def cache(cfg: Config) -> dict:
    """Cache ``cfg.data.source`` as HDF5 shards under the storage root (a no-op when already cached)."""
    result = cache_dataset(cfg)
    splits = result.manifest["splits"]
    return {"dataset_uri": result.uri, "created": result.created,
            "num_train": splits["train"]["count"], "num_val": splits["val"]["count"]}
