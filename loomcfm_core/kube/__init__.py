"""Training on Kubernetes as a KubeRay ``RayJob``, from a KFP step or a laptop with a kubeconfig.

``settings``: the ``kube`` config section · ``rayjob``: the RayJob of one run, from the packaged template ·
``client``: the API server, its errors and retries · ``status``: KubeRay's lifecycle as the launcher reads it ·
``logs``: the driver's log copied into this process's · ``launcher``: create or adopt, watch, clean up.
"""
