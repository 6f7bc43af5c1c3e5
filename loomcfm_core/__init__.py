"""loomcfm: a production pipeline for LOOM-CFM flow matching (ICLR 2025)."""

import os

# A pipeline should not phone home: Ray's usage statistics and MLflow's telemetry are on by default and
# would reach the internet from every run, and the Hugging Face hub under diffusers must never be asked for
# weights (autoencoders come from a configured path). An explicit setting by the user still wins.
for _var, _off in (("RAY_USAGE_STATS_ENABLED", "0"), ("MLFLOW_DISABLE_TELEMETRY", "true"), ("HF_HUB_OFFLINE", "1"),
                   ("HF_HUB_DISABLE_TELEMETRY", "1")):
    os.environ.setdefault(_var, _off)

__version__ = "0.1.0"

# The one image every KFP step and Ray pod runs (docker/ builds it; k8s/ and the KFP components use it).
# Push it under your own registry and set LOOMCFM_IMAGE before compiling pipelines or rendering manifests.
IMAGE = os.environ.get("LOOMCFM_IMAGE", f"ghcr.io/loomcfm/loomcfm:{__version__}")
