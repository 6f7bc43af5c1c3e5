"""``loomcfm pipeline submit`` with the real ``kfp.Client`` against a double of the KFP 2.17 API server
(tests/kfp/kfp_api.py, which enforces the server's rules and records every request)."""

from __future__ import annotations

import re

import kfp
import pytest
from kfp_server_api.exceptions import ApiException

from loomcfm_core import __version__
from loomcfm_core.errors import UsageError
from pipelines import runner, submit
from tests.kfp.kfp_api import KfpApi, check_cron, serve


@pytest.fixture()
def kfp_api():
    api = KfpApi()
    server = serve(api)
    try:
        yield api, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _uploads(api):
    return [(path.rsplit("/", 1)[1], query.get("name", [""])[0]) for method, path, query, _ in api.requests
            if path.endswith(("/upload", "/upload_version"))]


def test_submit_uploads_a_version_and_runs_it_as_the_service_account(kfp_api):
    api, host = kfp_api
    args = runner.arguments("full", "cluster", ["train.lr=1e-4"], None)
    url = runner.submit(host, "full", args, service_account="loomcfm-pipeline")
    (run,) = api.runs.values()
    assert url == f"{host}/#/runs/details/{run['run_id']}"
    (pipeline,) = api.pipelines.values()
    assert pipeline["name"] == "loomcfm" and pipeline["description"].startswith("LOOM-CFM")
    versions = {v["name"]: v for v in api.versions.values()}
    revision = submit.git_revision()
    expected = f"{__version__}-g{revision[0]}" if revision else None
    (ours,) = [v for name, v in versions.items() if name != "loomcfm"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9.-]*", ours["name"])
    if revision and not revision[1]:
        assert ours["name"] == expected
    else:
        assert ours["name"].startswith(f"{__version__}-")
    assert run["pipeline_version_reference"] == {"pipeline_id": pipeline["pipeline_id"],
                                                 "pipeline_version_id": ours["pipeline_version_id"]}
    assert run["service_account"] == "loomcfm-pipeline"
    assert run["runtime_config"]["parameters"] == args and args["config_yaml"] == "cluster"
    assert api.experiments[run["experiment_id"]]["display_name"] == "loomcfm"
    # the same package again: the version is found, not uploaded a second time (the server would say 409)
    runner.submit(host, "full", args, experiment="nightly")
    assert _uploads(api) == [("upload", "loomcfm"), ("upload_version", ours["name"])]
    assert len(api.runs) == 2 and {e["display_name"] for e in api.experiments.values()} == {"loomcfm", "nightly"}
    # --launcher rayjob: the package whose train steps watch RayJobs, a pipeline of its own
    runner.submit(host, "full", args, launcher="rayjob")
    assert {p["name"] for p in api.pipelines.values()} == {"loomcfm", "loomcfm-rayjob"}


def test_schedule_makes_a_recurring_run_of_the_version(kfp_api):
    api, host = kfp_api
    args = runner.arguments("reflow", "cluster", [], "s3://loomcfm/loomcfm/runs/x/checkpoints/step-00000001.pt")
    url = runner.submit(host, "reflow", args, schedule="0 0 2 * * *", service_account="loomcfm-pipeline")
    (recurring,) = api.recurring_runs.values()
    assert url.endswith(f"/#/recurringrun/details/{recurring['recurring_run_id']}") and not api.runs
    assert recurring["trigger"]["cron_schedule"]["cron"] == "0 0 2 * * *"
    assert recurring["service_account"] == "loomcfm-pipeline" and recurring["mode"] == "ENABLE"
    version = api.versions[recurring["pipeline_version_reference"]["pipeline_version_id"]]
    assert api.pipelines[version["pipeline_id"]]["name"] == "loomcfm-reflow" and version["name"] != "loomcfm-reflow"
    sent = len(api.requests)
    with pytest.raises(UsageError, match=r"--schedule '0 2 \* \* \*': expected six fields, seconds first"):
        runner.submit(host, "reflow", args, schedule="0 2 * * *")
    assert len(api.requests) == sent, "a bad schedule is refused before anything is sent"


def test_the_double_refuses_what_the_api_server_refuses(kfp_api, tmp_path):
    api, host = kfp_api
    client = kfp.Client(host=host)
    runner.submit(host, "full", runner.arguments("full", "cluster", [], None))
    (run,) = api.runs.values()
    reference = run["pipeline_version_reference"]
    package = runner.compile_all(tmp_path)[0]
    with pytest.raises(ApiException) as caught:  # an int where the package declares a str GPU count
        client.run_pipeline(run["experiment_id"], "x", pipeline_id=reference["pipeline_id"],
                            version_id=reference["pipeline_version_id"], params={"accelerator_limit": 1})
    assert caught.value.status == 400 and "accelerator_limit requires type STRING" in caught.value.body
    with pytest.raises(ApiException) as caught:
        client.run_pipeline(run["experiment_id"], "x", pipeline_id=reference["pipeline_id"],
                            version_id=reference["pipeline_version_id"], params={"no_such": "1"})
    assert "not required by pipeline: no_such" in caught.value.body
    with pytest.raises(ApiException) as caught:
        client.upload_pipeline(str(package), pipeline_name="loomcfm")
    assert caught.value.status == 409
    name = api.versions[reference["pipeline_version_id"]]["name"]
    with pytest.raises(ApiException) as caught:
        client.upload_pipeline_version(str(package), pipeline_version_name=name, pipeline_id=reference["pipeline_id"])
    assert caught.value.status == 409
    with pytest.raises(ApiException) as caught:
        client.create_recurring_run(run["experiment_id"], "x", cron_expression="0 2 * *",
                                    pipeline_id=reference["pipeline_id"], version_id=reference["pipeline_version_id"])
    assert "Expected 5 to 6 fields, found 4" in caught.value.body
    bad = tmp_path / "bad.yaml"
    bad.write_text(package.read_text().replace("name: loomcfm\n", "name: LOOM_CFM\n", 1))
    with pytest.raises(ApiException) as caught:
        client.upload_pipeline(str(bad), pipeline_name="other")
    assert caught.value.status == 400 and "lowercase" in caught.value.body
    check_cron("@every 6h")
    check_cron("0 0 2 * * *")


def test_version_names(tmp_path):
    package = tmp_path / "p.yaml"
    package.write_text("pipelineInfo: {name: loomcfm}\n")
    assert submit.version_name(package, ("1a2b3c4d", False)) == f"{__version__}-g1a2b3c4d"
    dirty = submit.version_name(package, ("1a2b3c4d", True))
    assert re.fullmatch(rf"{re.escape(__version__)}-g1a2b3c4d-dirty-[0-9a-f]{{8}}", dirty)
    assert re.fullmatch(rf"{re.escape(__version__)}-[0-9a-f]{{8}}", submit.version_name(package, None))
    package.write_text("pipelineInfo: {name: loomcfm}\n# changed\n")
    assert submit.version_name(package, ("1a2b3c4d", True)) != dirty, "other content, other name"
    assert submit.git_revision(tmp_path) is None
    assert submit.check_schedule("@daily") == "@daily"
