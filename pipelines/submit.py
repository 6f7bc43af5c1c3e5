"""``loomcfm pipeline submit``: the compiled package as a *version* of a KFP pipeline, then a run or a
recurring run of that version.

Rules of the KFP 2.17 API this follows (kfp SDK 2.17 ``kfp/client/client.py``; kubeflow/pipelines 2.17.0
``backend/src/apiserver``): a pipeline is found by its display name (``get_pipeline_id``) and created by the
first upload, which also makes a version named like the pipeline; a further version needs the pipeline's id
and a name unique within it (a second upload of the same name is refused with 409); runs and recurring runs
of a stored version need the experiment id, the pipeline id *and* the version id (``_create_job_config``);
a cron schedule is parsed by robfig/cron v1 (``server/api_converter.go``): six fields, seconds first.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import tempfile
from pathlib import Path

import yaml
from kfp import compiler

from loomcfm_core import __version__
from loomcfm_core.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
EQUALS = 1  # kfp.client.client._FILTER_OPERATIONS['EQUALS'] (filter.proto)
CRON_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly", "@every ")


def check_schedule(cron: str) -> str:
    """A schedule the KFP API server reads as the user means it, or a UsageError naming ``--schedule``.

    robfig/cron v1 also accepts five fields, but reads them as *seconds* minute hour day month: a standard
    crontab line such as ``0 2 * * *`` would run at minute 2 of every hour. Six fields (or a descriptor such
    as ``@daily`` / ``@every 6h``) leave no doubt.
    """
    cron = cron.strip()
    if cron.startswith(CRON_DESCRIPTORS) or len(cron.split()) == 6:
        return cron
    raise UsageError(f"--schedule {cron!r}: expected six fields, seconds first (e.g. '0 0 2 * * *' = 02:00 every "
                     f"day), or one of {', '.join(d.strip() for d in CRON_DESCRIPTORS)}")


def git_revision(repo: Path = REPO) -> tuple[str, bool] | None:
    """(short commit, whether tracked files differ from it) of the checkout the pipelines come from; None
    outside a git checkout (an installed package)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
    try:
        rev = git("rev-parse", "--short=8", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return rev, dirty


def version_name(package: Path, revision: tuple[str, bool] | None) -> str:
    """``<package version>-g<commit>``, plus a digest of the compiled package when it is not that commit's
    (uncommitted changes, or no git): the same name always means the same package. Lower case, digits, ``.``
    and ``-`` only (a DNS-1123 name, which KFP's Kubernetes pipeline store requires)."""
    digest = hashlib.sha256(package.read_bytes()).hexdigest()[:8]
    if revision is None:
        name = f"{__version__}-{digest}"
    else:
        rev, dirty = revision
        name = f"{__version__}-g{rev}" + (f"-dirty-{digest}" if dirty else "")
    return re.sub(r"[^a-z0-9.-]", "-", name.lower())


def pipeline_info(package: Path) -> dict:
    """The package's ``pipelineInfo`` (name, description): the first of its YAML documents holds it."""
    return next(yaml.safe_load_all(package.read_text()))["pipelineInfo"]


def _by_name(name: str) -> str:
    return json.dumps({"predicates": [{"operation": EQUALS, "key": "display_name", "stringValue": name}]})


def upload(client, package: Path, version: str) -> tuple[str, str]:
    """(pipeline id, version id) of ``version`` of the package's pipeline, uploading what is missing."""
    info = pipeline_info(package)
    pipeline_id = client.get_pipeline_id(info["name"])
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(str(package), pipeline_name=info["name"],
                                             description=info.get("description")).pipeline_id
    found = client.list_pipeline_versions(pipeline_id, filter=_by_name(version)).pipeline_versions or []
    if found:
        return pipeline_id, found[0].pipeline_version_id
    created = client.upload_pipeline_version(str(package), pipeline_version_name=version, pipeline_id=pipeline_id,
                                             description=info.get("description"))
    return pipeline_id, created.pipeline_version_id


def submit(client, host: str, func, filename: str, args: dict, experiment: str | None = None,
           schedule: str | None = None, service_account: str | None = None) -> str:
    """Upload the freshly compiled pipeline as a version and start it; returns the run's (or recurring
    run's) URL.

    Args:
        client: a ``kfp.Client`` for ``host``.
        func: the ``@dsl.pipeline`` function; ``filename`` the package's file name.
        args: the pipeline's arguments (validated by the caller).
        experiment: KFP experiment name; default: the pipeline's name.
        schedule: a cron schedule (:func:`check_schedule`): a recurring run instead of one run.
        service_account: the Kubernetes service account the run's pods use; default: the server's.
    """
    schedule = check_schedule(schedule) if schedule else None
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / filename
        compiler.Compiler().compile(func, str(package))
        version = version_name(package, git_revision())
        pipeline_id, version_id = upload(client, package, version)
        name = pipeline_info(package)["name"]
    experiment_id = client.create_experiment(experiment or name).experiment_id
    job = f"{name} {version}"
    if schedule:
        made = client.create_recurring_run(experiment_id, job, cron_expression=schedule, pipeline_id=pipeline_id,
                                           version_id=version_id, params=args, service_account=service_account)
        return f"{host.rstrip('/')}/#/recurringrun/details/{made.recurring_run_id}"
    run = client.run_pipeline(experiment_id, job, pipeline_id=pipeline_id, version_id=version_id, params=args,
                              service_account=service_account)
    return f"{host.rstrip('/')}/#/runs/details/{run.run_id}"
