"""What a stage learns from the KFP pod it runs in: whether it is one, which pipeline run it belongs to,
and whether the config can work there.

The KFP driver sets ``KFP_POD_NAME`` on every step's container (kubeflow/pipelines 2.17.0
``backend/src/v2/compiler/argocompiler/common.go``, ``backend/src/v2/component/constants.go``). The API
server labels every pod of a run ``pipeline/runid=<run id>`` (``backend/src/apiserver/template/
argo_template.go`` ``SetPodMetadataLabels``); ``pipelines/common.py`` exposes that label as ``KFP_RUN_ID``
through the downward API, which, unlike a step input, is not part of KFP's cache key. ``kfp.local`` runs
have neither; ``pipelines.runner.run_local`` sets ``KFP_RUN_ID`` for its steps itself.
"""

from __future__ import annotations

import os

from loomcfm_core.config import Config
from loomcfm_core.errors import ConfigError
from loomcfm_core.storage import is_remote
from loomcfm_core.tracking import find_pipeline_run, is_server

POD_ENV = "KFP_POD_NAME"
POD_UID_ENV = "KFP_POD_UID"  # argocompiler/common.go commonEnvs: fieldRef metadata.uid
RUN_ID_ENV = "KFP_RUN_ID"
# where the kubelet mounts a pod's ServiceAccount: its namespace is the pod's
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def in_kfp_pod() -> bool:
    return bool(os.environ.get(POD_ENV))


def step_pod(namespace_file: str | None = None) -> tuple[str, str, str] | None:
    """(namespace, name, uid) of the KFP step pod this runs in, or None outside one (or when its namespace
    cannot be read: no ServiceAccount token mounted)."""
    name, uid = os.environ.get(POD_ENV, ""), os.environ.get(POD_UID_ENV, "")
    if not (name and uid):
        return None
    try:
        with open(namespace_file or NAMESPACE_FILE) as handle:
            namespace = handle.read().strip()
    except OSError:
        return None
    return (namespace, name, uid) if name and uid and namespace else None


def kfp_run_id() -> str:
    """This step's KFP run id, empty outside a pipeline run."""
    return os.environ.get(RUN_ID_ENV, "")


def check_shared(cfg: Config) -> None:
    """In a KFP pod, refuse settings that keep data or runs on the pod's own disk.

    Each step is another pod: a local ``storage.root`` loses the cached dataset before training reads it,
    and a SQLite tracking store makes every step's MLflow run invisible to the next. Outside a KFP pod
    (the CLI, ``kfp.local``) local settings are what a laptop wants, so nothing is checked.

    Raises:
        ConfigError: naming every offending key, with what a cluster needs instead.
    """
    if not in_kfp_pod():
        return
    problems = []
    if not is_remote(cfg.storage.root):
        problems.append(f"storage.root={cfg.storage.root!r} is this pod's disk; expected shared storage "
                        "(s3://bucket/prefix)")
    if not (cfg.tracking.uri and is_server(cfg.tracking.uri)):
        problems.append(f"tracking.uri={cfg.tracking.uri!r} is a file store in this pod; expected the MLflow "
                        "server's http(s):// URL")
    if problems:
        raise ConfigError(f"this step runs in a KFP pod ({POD_ENV}={os.environ[POD_ENV]}), where every step "
                          f"is another pod: " + "; ".join(problems) + ". Use config_yaml=cluster (the "
                          "packages' default) or set both keys.")


def pipeline_parent(cfg: Config) -> str | None:
    """The MLflow parent run of this step's pipeline run (opened by its ``prepare`` step), or None when the
    step does not run in a pipeline."""
    run_id = kfp_run_id()
    return find_pipeline_run(cfg.tracking, cfg.experiment, run_id) if run_id else None
