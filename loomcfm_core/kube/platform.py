"""What a cluster set up with ``k8s/`` holds for loomcfm, named once: the Secrets and ConfigMap every step and
RayJob reads (with the keys read from them), the Role the launcher's identity needs, the KubeRay objects the
RayJob uses, and the labels that tie a RayJob to the KFP step pod that watches it.

``pipelines/common.py`` mounts these into every KFP step; ``loomcfm_core/kube/preflight.py`` checks them;
``k8s/base`` creates the ConfigMap and the RBAC objects (the Secrets are the user's).
"""

from __future__ import annotations

from dataclasses import dataclass

S3_SECRET, MLFLOW_SECRET, ENV_CONFIG_MAP = "loomcfm-s3", "loomcfm-mlflow", "loomcfm-env"
# env name -> key, as the KFP steps read them (pipelines/common.py)
S3_SECRET_KEYS = {k: k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
MLFLOW_SECRET_KEYS = {k: k for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
ENV_CONFIG_KEYS = {k: k for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL",
                                  "LOOMCFM_STORAGE_ROOT", "LOOMCFM_TRACKING_URI")}
# /dev/shm of the steps that run DataLoader workers or Ray (its object store lives there; a container's default
# is 64 MiB); pipelines/common.py mounts it, the check step verifies it
STEP_SHM = "2Gi"
CRDS = ("rayjobs.ray.io", "rayclusters.ray.io")
OWNER_POD = "loomcfm.io/owner-pod"  # annotation: <namespace>/<name> of the KFP step pod watching the RayJob
OWNER_UID = "loomcfm.io/owner-pod-uid"  # annotation: that pod's uid (a pod recreated with the name is another)
ON_TERMINATE = "loomcfm.io/on-terminate"  # annotation: kube.on_terminate; `leave` RayJobs are never reaped


@dataclass(frozen=True)
class Access:
    """One request the launcher or a step makes, as a SelfSubjectAccessReview asks it."""

    verb: str
    group: str
    resource: str
    subresource: str = ""
    why: str = ""

    def text(self) -> str:
        resource = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        return f"{self.verb} {resource}" + (f".{self.group}" if self.group else "")


# What the launcher does in the RayJob's namespace (k8s/base/rbac.yaml, Role loomcfm-rayjob-launcher).
LAUNCHER_ACCESS = (
    Access("create", "ray.io", "rayjobs", why="start the training"),
    Access("get", "ray.io", "rayjobs", why="follow its status"),
    Access("delete", "ray.io", "rayjobs", why="clean up, and on SIGTERM"),
    Access("patch", "ray.io", "rayjobs", why="a retried step adopting the RayJob names itself its watcher"),
    Access("list", "ray.io", "rayjobs", why="reap the RayJobs of terminated steps"),
    Access("list", "", "pods", why="find the driver's and the cluster's pods"),
    Access("get", "", "pods", "log", why="copy the driver's log"),
    Access("list", "", "events", why="say why a pod waits or cannot start"),
)
