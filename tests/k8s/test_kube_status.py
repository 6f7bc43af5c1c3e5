"""How the launcher reads a RayJob's status (loomcfm_core/kube/status.py): which of KubeRay v1.7.0's states end
the wait (``rayjob_types.go`` ``IsJobDeploymentTerminal``: Complete and Failed; ValidationFailed is never
left), which one is a success, the attempt number, and the progress log with its new attempts, driven by a
clock the test moves."""

from __future__ import annotations

import logging

from loomcfm_core.kube.status import Observation, Progress, gist

NOT_TERMINAL = [{}, {"jobDeploymentStatus": "Initializing"}, {"jobDeploymentStatus": "Waiting"},
                {"jobDeploymentStatus": "Running", "jobStatus": "PENDING"},
                {"jobDeploymentStatus": "Running", "jobStatus": "FAILED"},  # the submitter has not finished yet
                {"jobDeploymentStatus": "Running", "jobStatus": "SUCCEEDED"},
                {"jobDeploymentStatus": "Retrying", "jobStatus": "FAILED", "reason": "AppFailed", "failed": 1},
                {"jobDeploymentStatus": "Suspending"}, {"jobDeploymentStatus": "Suspended"}]


def test_only_complete_and_failed_states_end_the_wait_and_only_a_succeeded_job_is_a_success():
    for status in NOT_TERMINAL:
        obs = Observation.of(status)
        assert not obs.ended and not obs.succeeded_run, status
    assert Observation.of(None) == Observation()
    success = Observation.of({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "succeeded": 1})
    assert success.ended and success.succeeded_run
    stopped = Observation.of({"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"})
    assert stopped.ended and not stopped.succeeded_run
    for state in ("Failed", "ValidationFailed"):
        obs = Observation.of({"jobDeploymentStatus": state, "jobStatus": "SUCCEEDED", "failed": 2})
        assert obs.ended and not obs.succeeded_run


def test_the_attempt_is_the_running_one_or_the_number_made():
    assert Observation.of({"jobDeploymentStatus": "Running", "failed": 1}).attempt == 2
    assert Observation.of({"jobDeploymentStatus": "Retrying", "failed": 1}).attempt == 2
    assert Observation.of({"jobDeploymentStatus": "Failed", "failed": 3}).attempt == 3
    assert Observation.of({"jobDeploymentStatus": "ValidationFailed"}).attempt == 0
    assert Observation.of({"jobDeploymentStatus": "Complete", "failed": 1, "succeeded": 1}).attempt == 2


def test_gist_keeps_what_failed_and_why():
    message = "Job entrypoint command failed with exit code 1, last logs:\nTraceback\n  ...\nValueError: bad\n"
    assert gist(message) == "Job entrypoint command failed with exit code 1, last logs: ... ValueError: bad"
    assert gist("one line") == "one line" and gist("x" * 400).endswith("...") and len(gist("x" * 400)) == 303


def test_progress_logs_each_change_with_attempt_and_time_and_says_why_a_new_attempt_began(caplog):
    caplog.set_level(logging.INFO, logger="loomcfm_core.kube.status")
    now = [0.0]
    progress = Progress("rj", attempts=3, clock=lambda: now[0])
    reads = [(5, {"jobDeploymentStatus": "Initializing", "jobId": "rj-aaaaa"}),
             (65, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "jobId": "rj-aaaaa"}),
             (70, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "jobId": "rj-aaaaa"}),  # no change
             # Retrying passed between two reads: the count grew and the id changed
             (130, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "jobId": "rj-bbbbb", "failed": 1}),
             (200, {"jobDeploymentStatus": "Suspended", "failed": 1}),
             (260, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "jobId": "rj-ccccc", "failed": 1})]
    for moment, status in reads:
        now[0] = moment
        progress.update(Observation.of(status))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "RayJob rj: Initializing (attempt 1/3, 5 s)",
        "RayJob rj: Running job=RUNNING (attempt 1/3, 65 s)",
        "RayJob rj: attempt 2/3 started after 130 s; the previous one failed (KubeRay retried between two reads: "
        "kubectl describe rayjob shows why)",
        "RayJob rj: Running job=RUNNING (attempt 2/3, 130 s)",
        "RayJob rj: Suspended (attempt 2/3, 200 s)",
        "RayJob rj: a new Ray job rj-ccccc started after 260 s (attempt 2/3): the RayJob was suspended and resumed",
        "RayJob rj: Running job=RUNNING (attempt 2/3, 260 s)"]


def test_a_seen_retry_names_the_failure_of_the_previous_attempt(caplog):
    caplog.set_level(logging.INFO, logger="loomcfm_core.kube.status")
    progress = Progress("rj", attempts=2, clock=lambda: 0.0)
    for status in ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "jobId": "rj-aaaaa"},
                   {"jobDeploymentStatus": "Retrying", "jobStatus": "FAILED", "reason": "AppFailed", "failed": 1,
                    "message": "Job entrypoint command failed with exit code 137\nKilled"},
                   {"jobDeploymentStatus": "Initializing", "jobId": "rj-bbbbb", "failed": 1}):
        progress.update(Observation.of(status))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["RayJob rj: attempt 2/2 started after 0 s; the previous one failed (AppFailed: Job entrypoint "
                        "command failed with exit code 137 ... Killed)"], "one line per new attempt, no restart line"
