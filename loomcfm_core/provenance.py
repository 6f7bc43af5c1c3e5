"""What a run says about where it came from: the package version, the git commit of the code, the config's
name and hash, and a run name a person can tell apart from the previous one.

The commit comes from the installed package's metadata (``pip install git+...`` records it in
``direct_url.json``) or, for a checkout (an editable install, ``PYTHONPATH``), from ``git`` in that checkout;
when neither knows it (a wheel, an image without ``.git``) it is simply not recorded: provenance never fails a
stage.
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import time
from importlib import metadata
from pathlib import Path

import loomcfm_core

VERSION_TAG, COMMIT_TAG = "loomcfm.version", "mlflow.source.git.commit"  # MLflow's UI shows the commit
CONFIG_TAG, CONFIG_HASH_TAG = "loomcfm.config", "loomcfm.config_hash"


@functools.cache
def git_commit() -> str | None:
    """The commit of the running code, or None when nothing records it."""
    try:
        direct = metadata.distribution("loomcfm").read_text("direct_url.json")
        commit = json.loads(direct or "{}").get("vcs_info", {}).get("commit_id")
        if commit:
            return commit
    except (metadata.PackageNotFoundError, ValueError):
        pass
    checkout = Path(loomcfm_core.__file__).resolve().parent.parent
    if not (checkout / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def config_hash(config_yaml: str) -> str:
    """A short hash of the resolved config: two runs with the same hash ran the same settings."""
    return hashlib.sha256(config_yaml.encode()).hexdigest()[:12]


def run_tags(config_name: str, config_yaml: str) -> dict[str, str]:
    """The provenance tags of a stage run: version, commit (when known), config name and hash."""
    tags = {VERSION_TAG: loomcfm_core.__version__, CONFIG_TAG: config_name, CONFIG_HASH_TAG: config_hash(config_yaml)}
    commit = git_commit()
    return {**tags, COMMIT_TAG: commit} if commit else tags


def run_name(config_name: str, stage: str, when: float | None = None) -> str:
    """``<config> <stage> <MM-DD HH:MM>``: a second ``loomcfm run`` is told apart from the first at a glance
    (MLflow adds no id to a name it is given)."""
    return f"{config_name} {stage} {time.strftime('%m-%d %H:%M', time.localtime(when))}"
