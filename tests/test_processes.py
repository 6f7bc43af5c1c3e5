"""Which process holds something, and whether it lives: start times and descendants as the kernel reports them
(through psutil), dead and zombie processes as gone."""

import os
import signal
import subprocess
import time

from loomcfm_core.processes import Holder, descendants, start_time


def test_a_process_is_its_pid_and_its_start_time():
    child = subprocess.Popen(["sleep", "30"])
    try:
        started = start_time(child.pid)
        assert started and started == start_time(child.pid), "the same process reads the same every time"
        assert child.pid in descendants(os.getpid())
        holder = Holder(Holder.me().host, child.pid, started)
        assert holder.alive() and not Holder(holder.host, child.pid, str(float(started) + 1)).alive(), \
            "another process that got the same pid is not the holder"
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while start_time(child.pid) is not None and time.monotonic() < deadline:  # a zombie until reaped
            time.sleep(0.05)
        assert start_time(child.pid) is None and not holder.alive(), "a killed process is gone, reaped or not"
    finally:
        child.kill()
        child.wait()
    assert start_time(child.pid) is None and child.pid not in descendants(os.getpid())
