"""KFP step: ``loomcfm cluster check`` as the first step of every pipeline (never cached), so a run on a broken
cluster fails in minutes with the table of checks in its log."""

from kfp import dsl

from loomcfm_core import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def cluster_check(config_yaml: str, overrides: list, launcher: str = "local", namespace: str = "loomcfm",
                  image: str = "", ray_workers: int = 1, gpus_per_worker: int = 0, worker_cpu: str = "4",
                  worker_memory: str = "8Gi", gpu_node_selector: str = "nvidia.com/gpu.present=true"):
    """Checks what this run will use: with ``launcher`` rayjob KubeRay, the RBAC of this step's ServiceAccount,
    the Secrets and nodes for the RayCluster the cluster parameters shape; always what this pod's environment,
    the MLflow server, the storage and /dev/shm give the steps. Outside Kubernetes (kfp.local) with the local
    launcher there is nothing to check. Defaults are literals: KFP runs this function's source alone."""
    from loomcfm_core.offline import stay_offline

    stay_offline()
    from loomcfm_core import stages
    from loomcfm_core.config import load_config_text
    from loomcfm_core.kube.settings import as_overrides

    kube = as_overrides(namespace=namespace, image=image or None, ray_workers=ray_workers,
                        gpus_per_worker=gpus_per_worker, worker_cpu=worker_cpu, worker_memory=worker_memory,
                        gpu_node_selector=gpu_node_selector)
    stages.check_cluster(load_config_text(config_yaml, [*overrides, *kube]), launcher, step=True)
