"""One training per run folder: the lease on local disk and on a real moto S3 server, then two real
``loomcfm train`` processes on one run folder."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import boto3
import pytest
from botocore.exceptions import ClientError
from mlflow.tracking import MlflowClient

from loomcfm_core.checkpoint import list_checkpoints
from loomcfm_core.errors import LeaseError
from loomcfm_core.lease import LEASE_FILE, Lease, check_held
from loomcfm_core.processes import start_time
from loomcfm_core.storage import join, storage_for
from tests.run_cli import TINY, alive_in_session, call, error_line, ours, sets, start, wait_for


@pytest.fixture(params=["local", "s3"])
def run_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs" / "r")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/runs/r"


def test_the_s3_server_refuses_a_second_conditional_create(s3_bucket):
    """What the S3 lease stands on, asked of the real moto server with boto3: PutObject with If-None-Match: *
    is refused with 412 when the key exists, and so is If-Match with an ETag that is no longer current."""
    client = boto3.client("s3")
    first = client.put_object(Bucket=s3_bucket, Key="k", Body=b"a", IfNoneMatch="*")
    with pytest.raises(ClientError) as refused:
        client.put_object(Bucket=s3_bucket, Key="k", Body=b"b", IfNoneMatch="*")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    client.put_object(Bucket=s3_bucket, Key="k", Body=b"c", IfMatch=first["ETag"])
    with pytest.raises(ClientError) as stale:
        client.put_object(Bucket=s3_bucket, Key="k", Body=b"d", IfMatch=first["ETag"])
    assert stale.value.response["Error"]["Code"] == "PreconditionFailed"


def _rewrite_holder(run_uri: str, **holder) -> None:
    """Make the lease name another holder, as if another process held it."""
    uri = join(run_uri, LEASE_FILE)
    record = json.loads(storage_for(uri).read_text(uri))
    record["holder"].update(holder)
    storage_for(uri).write_text(uri, json.dumps(record))


def test_a_held_lease_is_refused_naming_its_holder_and_free_again_after_release(run_uri):
    with Lease(run_uri, ttl=30):
        with pytest.raises(LeaseError, match=rf"{run_uri} is being trained by pid {os.getpid()} on .* wait for it "
                                             r"with `loomcfm train --wait`"):
            Lease(run_uri, ttl=30).acquire()
    with Lease(run_uri, ttl=30):
        pass
    assert not storage_for(run_uri).exists(join(run_uri, LEASE_FILE)), "released: the object is gone"


def test_writers_other_than_the_holder_are_fenced_by_its_token(run_uri):
    """Ray workers check the driver's lease before writing: after a takeover, an orphaned worker stops."""
    lease = Lease(run_uri, ttl=30)
    lease.acquire()
    check_held(run_uri, lease.token)
    taker = Lease(run_uri, ttl=30)  # another training took the folder over (compare-and-swap on its version)
    taker.tag = taker.object.replace(taker.object.read()[1], taker._record())
    with pytest.raises(LeaseError, match=rf"{run_uri}: the run folder's lease is no longer this training's \(held by "
                                         rf"pid {os.getpid()} on .*\); stopping without writing"):
        check_held(run_uri, lease.token)
    taker.object.delete(taker.tag)
    with pytest.raises(LeaseError, match=r"\(released\)"):
        check_held(run_uri, lease.token)


def test_a_dead_holder_on_this_host_is_replaced_at_once(run_uri):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    started = start_time(dead.pid)
    dead.wait()
    lease = Lease(run_uri, ttl=300)
    lease.acquire()
    _rewrite_holder(run_uri, pid=dead.pid, started=started)
    taker = Lease(run_uri, ttl=300)
    taker.acquire()  # no waiting for the 300 s: the holder's process is known to be gone
    assert taker.object.read()[1] == taker.tag


def test_a_holder_elsewhere_is_replaced_once_its_heartbeat_expired(run_uri):
    Lease(run_uri, ttl=2).acquire()
    _rewrite_holder(run_uri, host="another-node")
    with pytest.raises(LeaseError, match="is being trained by pid .* on another-node"):
        Lease(run_uri, ttl=2).acquire()
    time.sleep(3.5)  # S3's LastModified has whole seconds
    Lease(run_uri, ttl=2).acquire()


@pytest.mark.process
def test_a_waiting_training_gets_the_lease_when_the_holder_releases_it(run_uri):
    holder = Lease(run_uri, ttl=30)
    holder.acquire()
    script = textwrap.dedent(f"""
        from loomcfm_core.lease import Lease
        with Lease({run_uri!r}, ttl=30, wait=True, poll=0.2):
            print("acquired", flush=True)
    """)
    waiter = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=os.environ)
    time.sleep(3)
    assert waiter.poll() is None, "it waits while the lease is held"
    holder.object.delete(holder.tag)
    assert waiter.communicate(timeout=60)[0].strip() == "acquired"


@pytest.mark.process
def test_a_training_that_lost_its_lease_stops_saying_so(tmp_path):
    run_uri = str(tmp_path / "runs" / "r")
    script = textwrap.dedent(f"""
        import time
        from loomcfm_core.lease import Lease
        with Lease({run_uri!r}, ttl=2):
            print("holding", flush=True)
            time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "holding"
    _rewrite_holder(run_uri, host="thief", pid=1, started="")  # another training took the folder over
    _, err = holder.communicate(timeout=60)
    assert holder.returncode == 1 and "LeaseError" in err and "this training lost its lease" in err, err


# ---- two real trainings of one run folder ------------------------------------------------------------------

def _train(*extra):
    return ["train", *sets(*TINY, "train.checkpoint_every=10", "train.run_name=shared", *extra)]


def _steps(run_uri):
    return [step for step, _ in list_checkpoints(run_uri)]


def _dataset(root_uri):
    """The cached dataset under a storage root (the first training cached it)."""
    manifests = [u for u in storage_for(root_uri).list(join(root_uri, "datasets")) if u.endswith("/manifest.json")]
    return ["--dataset", manifests[0].rsplit("/", 1)[0]]


@pytest.mark.ray
def test_two_trainings_of_one_s3_run_folder(tmp_path, s3_bucket, capfd):
    """On S3: the second fails fast naming the first, a third waits (``--wait``) and, once the first is killed,
    takes the lease over, cleans up what the killed one left (its Ray, an unfinished multipart upload of a
    checkpoint) and resumes from its latest checkpoint; SIGTERM
    then stops it leaving nothing behind: the lease released, no process of its session alive, its MLflow run
    (the one the first opened, continued) KILLED. (A local run folder's takeover, and the exact resume after
    it: ``tests/training/test_launch.py``.)"""
    root = f"s3://{s3_bucket}/loomcfm"
    common = sets(f"storage.root={root}", f"tracking.local_dir={tmp_path / 'runs'}", f"data.local_cache={tmp_path / 'node'}")
    run_uri = f"{root}/runs/shared"
    first = start(*_train("train.max_steps=100000"), *common, cwd=tmp_path)
    wait_for(lambda: _steps(run_uri), first, what="the first checkpoint")
    assert json.loads(storage_for(run_uri).read_text(join(run_uri, LEASE_FILE)))["holder"]["pid"] == first.pid

    second = call(*_train("train.max_steps=100000"), *_dataset(root), *common)
    assert second.returncode == 1
    assert f"{run_uri} is being trained by pid {first.pid} on " in error_line(second)

    waiting = start(*_train("train.max_steps=100000"), "--wait", *_dataset(root), *common, cwd=tmp_path)
    wait_for(lambda: "waiting for it (--wait)" in waiting.stderr, waiting, what="the waiting message")
    s3 = boto3.client("s3")  # the parts of a checkpoint's multipart upload cut short by the kill
    unfinished = s3.create_multipart_upload(Bucket=s3_bucket, Key="loomcfm/runs/shared/checkpoints/step-99999999.pt")
    s3.upload_part(Bucket=s3_bucket, Key=unfinished["Key"], UploadId=unfinished["UploadId"], PartNumber=1, Body=b"x")
    os.kill(first.pid, signal.SIGKILL)
    first.proc.wait()
    killed_at = _steps(run_uri)[-1]
    wait_for(lambda: f"resumed from {run_uri}/checkpoints/" in waiting.stderr, waiting, what="the resume")
    err = waiting.stderr
    assert f"took over the lease of pid {first.pid}" in err and f"resumed from {run_uri}/checkpoints/" in err
    assert f"{run_uri}/checkpoints: aborted 1 unfinished upload(s) a killed training left" in err
    assert not s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    # the killed driver's Ray worker may write checkpoints until the takeover fences it off (check_held)
    assert int(re.search(r"resumed from .*step-(\d+)\.pt", err).group(1)) >= killed_at
    assert not alive_in_session(first.pid), "the waiting training cleaned up what the killed one left"

    os.kill(waiting.pid, signal.SIGTERM)
    stopped = waiting.finish(timeout=300)
    err = stopped.stderr
    assert stopped.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.rstrip().endswith("loomcfm: stopped by SIGTERM") and "Traceback" not in ours(err), err[-3000:]
    time.sleep(2)
    assert not alive_in_session(waiting.pid), alive_in_session(waiting.pid)
    assert not storage_for(run_uri).exists(join(run_uri, LEASE_FILE)), "released on the way out"
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("loomcfm-digits").experiment_id],
                              filter_string="tags.`loomcfm.stage` = 'train'")
    assert [r.info.status for r in runs] == ["KILLED"], "one MLflow run, continued by the resume, then KILLED"
    assert runs[0].data.tags["loomcfm.ended_by"] == "stopped by SIGTERM"
    resumed = int(re.search(r"resumed from .*step-(\d+)\.pt", err).group(1))
    attempt = runs[0].data.tags["loomcfm.attempt.1"]  # the killed attempt stays visible on the continued run
    assert runs[0].data.tags["loomcfm.attempts"] == "2"
    assert attempt.startswith("RUNNING, died (last logged step ") and attempt.endswith(f"resumed from step {resumed}")
    assert int(re.search(r"last logged step (\d+)", attempt).group(1)) > 0
