"""``coupling.converge_epochs``: passes of LOOM reassignment over the data before any training.

The paper's "train after convergence" ablation (the reference's ``training.train_after``): each pass visits
every data point once in an ordinary shuffled epoch and reassigns its minibatch's noise exactly as a
training step would — regenerating noise from the seed table and solving the assignment — but never calls
the network. Because LOOM only accepts assignments that do not raise a minibatch's cost, the seed table's
mean pair cost (every point, every slot) never rises from one pass to the next; it is measured before the
first pass and after each, logged as ``coupling/table_cost`` (MLflow step = pass) and drawn as a plot.

Passes use the epochs ``0 .. N-1`` of the batch order and training continues at epoch ``N`` (as the
reference counts them). After every pass rank 0 writes ``<run>/converge.pt`` (the coupling, the costs, the
MLflow run), so an interrupted run resumes at the next pass and ends with the same table.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow
import torch
from tqdm.auto import tqdm

from loomcfm_core.checkpoint import load_checkpoint, write_state
from loomcfm_core.coupling import SeedCoupling
from loomcfm_core.data.dataset import ShardedDataset
from loomcfm_core.errors import UsageError
from loomcfm_core.layout import convergence_uri
from loomcfm_core.lease import check_held
from loomcfm_core.storage import storage_for
from loomcfm_core.training.distributed import all_gather, barrier, broadcast_from_rank0
from loomcfm_core.training.sampler import GlobalBatchSampler
from loomcfm_core.training.step import TrainState

METRIC = "coupling/table_cost"
log = logging.getLogger(__name__)


def table_mean_cost(coupling: SeedCoupling, dataset: ShardedDataset, device: torch.device,
                    batch: int = 1024) -> float:
    """Mean cost(x_i, noise) over every data point (flipped ones included) and every slot of the table."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(dataset), batch):
        index = torch.arange(start, min(start + batch, len(dataset)))
        data = torch.stack([dataset[i][0] for i in index.tolist()]).to(device)
        total += coupling.total_cost(data, index)
    return total.item() / coupling.table.numel()


def progress_run_id(run_uri: str) -> str | None:
    """The MLflow run an interrupted convergence logged into (a resume keeps the curve in one run)."""
    uri = convergence_uri(run_uri)
    return load_checkpoint(uri).get("mlflow_run_id") if storage_for(uri).exists(uri) else None


def plot_costs(costs: list[float], path: Path) -> Path:
    """The table's mean pair cost against the pass (0 = before the first), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(range(len(costs)), costs, marker="o")
    ax.set(xlabel="reassignment pass (0 = before the first)", ylabel="mean pair cost of the seed table",
           title="LOOM convergence before training")
    ax.set_xticks(range(len(costs)))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def converge(state: TrainState, dataset: ShardedDataset, sampler: GlobalBatchSampler, run_uri: str, rank: int = 0,
             mlflow_run_id: str | None = None, lease_token: str | None = None) -> list[float]:
    """Run the passes still missing (all of them, or those after ``<run>/converge.pt``); returns the costs.

    Every rank must call this (the batch gather and the assignment's broadcast are collectives); rank 0
    measures, logs into the active MLflow run and writes the progress file.
    """
    passes = state.cfg.coupling.converge_epochs
    if dataset.manifest.get("kind") == "latents":
        raise UsageError("coupling.converge_epochs: convergence passes over a latent cache are not implemented "
                         "(its targets are posterior draws); set coupling.converge_epochs=0")
    uri = convergence_uri(run_uri)
    costs: list[float] = []
    if storage_for(uri).exists(uri):
        progress = load_checkpoint(uri)
        state.coupling.load_state_dict(progress["coupling"])
        costs = list(progress["costs"])
        log.info("rank %d resumes convergence after pass %d of %d", rank, len(costs) - 1, passes)
    elif rank == 0:
        costs = [table_mean_cost(state.coupling, dataset, state.device)]
        mlflow.log_metric(METRIC, costs[0], step=0)
    done = len(costs) - 1 if costs else 0  # every rank reads the same progress file (rank 0 alone measures)
    for epoch in tqdm(range(done, passes), desc="LOOM convergence", unit="pass", disable=rank != 0):
        sampler.set_position(epoch)
        for batch in sampler:
            index = torch.tensor(batch)
            x1 = torch.stack([dataset[i][0] for i in batch]).to(state.device)
            state.coupling.couple(x1, index, gather=all_gather, broadcast=broadcast_from_rank0)
        if rank == 0:
            costs.append(table_mean_cost(state.coupling, dataset, state.device))
            mlflow.log_metric(METRIC, costs[-1], step=epoch + 1)
            if lease_token:
                check_held(run_uri, lease_token)
            write_state({"coupling": state.coupling.state_dict(), "costs": costs, "mlflow_run_id": mlflow_run_id},
                        uri)
        barrier()
    if rank == 0 and passes:
        with tempfile.TemporaryDirectory(prefix="loomcfm-converge-") as tmp:
            mlflow.log_artifact(str(plot_costs(costs, Path(tmp) / "converge.png")), "coupling")
        log.info("LOOM convergence: mean pair cost %s", " -> ".join(f"{c:.4f}" for c in costs))
    return costs
