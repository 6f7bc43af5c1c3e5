"""No run phones home: the settings that keep Ray, MLflow and the Hugging Face hub off the internet.

Ray's usage statistics and MLflow's telemetry are on by default and would reach the internet from every
run, and the hub under diffusers must never be asked for weights (autoencoders come from a configured
path). Importing the library changes nothing; the places where a process of ours starts apply these
defaults before any work: the CLI's ``main``, every KFP component, and :func:`~loomcfm_core.training.
local_ray.start_local_ray` (the local Ray's processes, and the workers they start, inherit its environment).
The image sets the same variables for every pod (``docker/Dockerfile``). A user's own setting always wins.
"""

from __future__ import annotations

import os

DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1"}


def stay_offline() -> None:
    """Set every variable of :data:`DEFAULTS` the environment does not set already, for this process and the
    processes it starts."""
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)
