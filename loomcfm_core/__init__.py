"""loomcfm: a production pipeline for LOOM-CFM flow matching (ICLR 2025)."""

import os

__version__ = "0.1.0"

# The one image every KFP step and Ray pod runs (docker/ builds it; k8s/ and the KFP components use it).
# Push it under your own registry and set LOOMCFM_IMAGE before compiling pipelines or rendering manifests.
IMAGE = os.environ.get("LOOMCFM_IMAGE", f"ghcr.io/loomcfm/loomcfm:{__version__}")
