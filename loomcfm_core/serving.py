"""The registered model: an ``mlflow.pyfunc`` generator, so images come out of the registry without our
code's entry points or an ODE solver of the caller's own.

``predict`` takes a table with either ``num_images`` (one row: that many images from the same noise seeds
``loomcfm sample`` uses) or ``seed`` (one row per image, explicit noise seeds), and the param ``method``
(``<solver>-<steps>``, default ``sample.method``); it returns uint8 images ``[n, C, H, W]``. The model
directory holds the EMA weights and the config YAML they were trained with, so ``mlflow models serve``
rebuilds exactly the trained network.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from loomcfm_core.config import Config, load_config_text
from loomcfm_core.errors import UsageError
from loomcfm_core.models.loading import build_model, default_device
from loomcfm_core.sampling import check_method, generate, sample_seeds, to_uint8

EXAMPLE_IMAGES = 2


def sample_seed_offset(cfg: Config) -> int:
    """Where ``loomcfm sample``'s noise seeds start for a config (the registered generator uses the same)."""
    return cfg.train.seed << 32


def signature(cfg: Config) -> ModelSignature:
    inputs = Schema([ColSpec("long", "num_images", required=False), ColSpec("long", "seed", required=False)])
    outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, *cfg.data.shape))])
    params = ParamSchema([ParamSpec("method", "string", cfg.sample.method)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


class Generator(mlflow.pyfunc.PythonModel):
    """The EMA network plus the sampler: noise seeds in, uint8 images out."""

    def load_context(self, context) -> None:
        self.cfg = load_config_text(Path(context.artifacts["config"]).read_text())
        self.device = default_device()
        self.model = build_model(self.cfg)
        self.model.load_state_dict(torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True))
        self.model.to(self.device).eval()

    def seeds(self, model_input: pd.DataFrame) -> torch.Tensor:
        """The noise seeds a request asks for: explicit ``seed`` rows, or ``num_images`` like ``loomcfm sample``."""
        columns = [c for c in ("seed", "num_images") if c in model_input.columns and model_input[c].notna().any()]
        if len(columns) != 1:
            raise UsageError("predict takes a 'num_images' column (one row) or a 'seed' column (one row per image), "
                             f"got columns {list(model_input.columns)}")
        if columns[0] == "seed":
            return torch.tensor(model_input["seed"].astype("int64").to_numpy())
        count = model_input["num_images"].dropna()
        if len(count) != 1 or int(count.iloc[0]) < 1:
            raise UsageError(f"predict: 'num_images' must be one positive number, got {count.tolist()}")
        return sample_seeds(int(count.iloc[0]), offset=sample_seed_offset(self.cfg))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        method = check_method((params or {}).get("method") or self.cfg.sample.method)
        samples = generate(self.model, self.cfg.data.shape, method, self.seeds(model_input),
                           self.cfg.sample.batch_size, self.device)
        return to_uint8(samples.images).numpy()


def log_generator(cfg: Config, model: torch.nn.Module, registered_model_name: str):
    """Log (and register) the generator of ``model``'s weights into the active run; returns MLflow's model info."""
    with tempfile.TemporaryDirectory(prefix="loomcfm-model-") as tmp:
        weights, config = Path(tmp) / "ema.pt", Path(tmp) / "config.yaml"
        torch.save(model.state_dict(), weights)
        config.write_text(cfg.to_yaml())
        example = (pd.DataFrame({"num_images": [EXAMPLE_IMAGES]}), {"method": cfg.sample.method})
        return mlflow.pyfunc.log_model(
            name="model", python_model=Generator(), artifacts={"weights": str(weights), "config": str(config)},
            signature=signature(cfg), input_example=example, registered_model_name=registered_model_name,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "loomcfm", "pandas"])
