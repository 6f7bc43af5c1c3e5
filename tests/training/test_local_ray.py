"""The Ray a command uses: a local one is checked against what it can run, and starting it keeps the
command's signal handlers and stopping it spares the processes that were not Ray's."""

import os
import subprocess
import sys
import textwrap

import pytest

from loomcfm_core.config import load_config
from loomcfm_core.training.local_ray import check_local_resources


def test_local_resources_are_checked_before_starting():
    with pytest.raises(ValueError, match=r"ray.num_workers=2 x ray.cpus_per_worker=2.0 needs 4 CPUs"):
        check_local_resources(load_config("digits", ["ray.num_workers=2"]).ray, {"CPU": 2.0})
    with pytest.raises(ValueError, match="GPUs"):
        check_local_resources(load_config("digits", ["ray.use_gpu=true"]).ray, {"CPU": 2.0})
    check_local_resources(load_config("digits").ray, {"CPU": 2.0})


@pytest.mark.ray
def test_starting_ray_keeps_the_commands_signal_handlers_and_stopping_it_spares_other_children(tmp_path):
    """``ray.init`` installs its own SIGTERM handler (``sys.exit(15)``); after ``connect`` the command's
    handler is back, so a SIGTERM between Ray stages still ends the stage's MLflow run KILLED. Stopping the
    local Ray kills what Ray started and nothing the process had started before (a test session's S3 server
    was killed that way once, in the middle of CI)."""
    script = textwrap.dedent("""
        import signal, subprocess
        from loomcfm_core.config import load_config
        from loomcfm_core.training.local_ray import connect, stop_local_ray

        def mine(signum, frame):
            pass

        signal.signal(signal.SIGTERM, mine)
        server = subprocess.Popen(["sleep", "600"])
        connect(load_config("digits", ["ray.cpus_per_worker=1"]).ray)
        try:
            print(signal.getsignal(signal.SIGTERM) is mine, flush=True)
        finally:
            stop_local_ray()
        print(server.poll() is None, flush=True)
        server.kill()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "True"]
