"""Training on Kubernetes as a KubeRay ``RayJob``, from a KFP step or a laptop with a kubeconfig.

``settings``: the ``kube`` config section · ``platform``: the Secrets, ConfigMaps, RBAC and annotations of a
cluster set up with k8s/, named once · ``rayjob``: the RayJob of one run, from the packaged template ·
``client``: the API server, its errors and retries · ``status``: KubeRay's lifecycle as the launcher reads it ·
``pods``: the pods below it while it starts · ``logs``: the driver's log copied into this process's ·
``launcher``: create or adopt, watch, clean up · ``reaper``: RayJobs nobody watches · ``cluster_check``,
``preflight``, ``crd``, ``capacity``, ``probe``: ``loomcfm cluster check``.
"""
