"""MLflow's system metrics (CPU, memory, disk, network; GPU utilisation and memory where ``nvidia-ml-py`` finds
an NVIDIA driver) sampled on a run by a thread of this process.

MLflow's own switch (``start_run(log_system_metrics=True)``) ties the sampler to the fluent active run, which a
Ray worker attaching to its driver's run must not end; so the sampler is MLflow's
``SystemMetricsMonitor`` started here for a run id, in the process that does the stage's work. It stops when
the body ends, or by itself when the run stops RUNNING or the server stops answering (an outage costs these
samples, nothing else); its last partial interval is dropped, so a stage shorter than the interval records
none.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)
STOP_SECONDS = 15.0  # the most a stage waits for the sampler's last upload


@contextmanager
def system_metrics(uri: str, run_id: str, seconds: float, node_id: str | None = None) -> Iterator[None]:
    """Sample system metrics on ``run_id`` every ``seconds`` (nothing for 0) for the ``with`` body.

    Args:
        node_id: keys ``system/<node_id>/...``, for a run that several machines sample.
    """
    if seconds <= 0:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    for name in ("mlflow.system_metrics.system_metrics_monitor", "mlflow.system_metrics.metrics.gpu_monitor"):
        logging.getLogger(name).setLevel(logging.ERROR)  # "Started monitoring", "Failed to get mlflow run"
    monitor = SystemMetricsMonitor(run_id, sampling_interval=seconds, resume_logging=True, node_id=node_id,
                                   tracking_uri=uri)
    monitor.start()
    try:
        yield
    finally:
        stopper = threading.Thread(target=monitor.finish, name="loomcfm-system-metrics-stop", daemon=True)
        stopper.start()
        stopper.join(STOP_SECONDS)
        if stopper.is_alive():
            log.warning("MLflow's system metrics of run %s did not stop within %.0f s (tracking server slow or "
                        "gone); left behind", run_id, STOP_SECONDS)
