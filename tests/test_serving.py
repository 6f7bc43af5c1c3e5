"""The registered model is an ``mlflow.pyfunc`` generator: the same images as ``loomcfm sample`` for the
same seeds, a signature and an input example, and ``mlflow models serve`` (a real server on 127.0.0.1)
answers a request with images."""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.models import Model
from mlflow.tracking import MlflowClient
from PIL import Image

from loomcfm_core import tracking
from loomcfm_core.checkpoint import checkpoint_sha256, save_checkpoint
from loomcfm_core.cli import main
from loomcfm_core.config import load_config
from loomcfm_core.models.loading import build_model
from loomcfm_core.serving import describe_checkpoint, register_model, sample_seed_offset
from loomcfm_core.sampling import sample_seeds
from tests.conftest import SMALL, _stop_group, free_port, wait_for_port

MODEL_URI = "models:/loomcfm-digits@base"


@pytest.fixture()
def registered(tmp_path):
    """A registered SMALL digits network whose output layer is random (a trained-for-3-steps one outputs
    almost zero velocity, under which every method gives the same images)."""
    cfg = load_config("digits", [*SMALL, f"tracking.local_dir={tmp_path}/runs", "train.seed=3",
                                 "sample.max_request_images=5"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    for p in model.out.parameters():
        torch.nn.init.normal_(p, std=0.1)
    checkpoint = save_checkpoint({"ema": model.state_dict()}, f"{tmp_path}/store/runs/r", step=1, keep=1)
    with tracking.start_run(cfg.tracking, cfg.experiment, "train") as run:
        pass
    version = register_model(cfg, run.info.run_id, model, "base", checkpoint, checkpoint_sha256(checkpoint))
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg.tracking))
    return cfg, checkpoint, version


def test_the_registered_generator_gives_the_images_loomcfm_sample_gives(tmp_path, registered):
    cfg, checkpoint, version = registered
    out = tmp_path / "samples"
    sets = [arg for item in [*SMALL, "train.seed=3"] for arg in ("--set", item)]
    assert main(["sample", "--ckpt", checkpoint, "--output", str(out), "--num_images", "5", "--method", "euler-2",
                 *sets]) == 0
    pngs = np.stack([np.asarray(Image.open(out / f"{i:05d}.png")) for i in range(5)])[:, None]
    generator = mlflow.pyfunc.load_model(MODEL_URI)
    by_count = generator.predict(pd.DataFrame({"num_images": [5]}), params={"method": "euler-2"})
    seeds = sample_seeds(5, offset=sample_seed_offset(cfg)).tolist()
    by_seed = generator.predict(pd.DataFrame({"seed": seeds}), params={"method": "euler-2"})
    assert by_count.dtype == np.uint8 and by_count.shape == (5, 1, 8, 8)
    np.testing.assert_array_equal(by_count, pngs)
    np.testing.assert_array_equal(by_seed, pngs)
    assert not np.array_equal(by_seed[:2], generator.predict(pd.DataFrame({"seed": seeds[:2]}),
                                                             params={"method": "euler-1"})), "the method counts"
    with pytest.raises(Exception, match="sampling method 'rk9-1'"):
        generator.predict(pd.DataFrame({"num_images": [1]}), params={"method": "rk9-1"})

    info = Model.load(MODEL_URI)
    assert info.signature.params.to_dict()[0]["name"] == "method"
    assert {c["name"] for c in info.signature.inputs.to_dict()} == {"num_images", "seed"}
    assert tuple(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 1, 8, 8)
    assert info.saved_input_example_info is not None
    assert describe_checkpoint(cfg.tracking, cfg.registered_model, checkpoint, "| method | NFE |") == [version]
    client = MlflowClient(tracking.tracking_uri(cfg.tracking))
    assert client.get_model_version("loomcfm-digits", version).description == "| method | NFE |"


# requests the served generator refuses, and the end of the message it answers with (after MLflow's
# "Failed to predict data '...'. Error: "); the registered config allows 5 images per request
_ALLOWED = "'num_images' must be one whole number from 1 to 5 (sample.max_request_images), got "
BAD_REQUESTS = [({"num_images": -1}, _ALLOWED + "[-1]"), ({"num_images": 0}, _ALLOWED + "[0]"),
                ({"num_images": 1e12}, _ALLOWED + "[1000000000000]"),
                ({"seed": list(range(6))}, "6 'seed' rows, but one request may ask for at most 5 images "
                                           "(sample.max_request_images): split the request"),
                ({"num_images": 1, "params": "rk9-1"}, "sampling method 'rk9-1': expected <solver>-<steps> with "
                                                      "solver one of euler, midpoint, rk4, dopri5, e.g. euler-4 or dopri5-1")]


def _post(port: int, request: dict) -> tuple[int, dict]:
    """POST a ``dataframe_split`` request to the scoring server; returns the HTTP status and the JSON answer."""
    request = dict(request)
    method = request.pop("params", "euler-1")
    columns = list(request)
    rows = [list(row) for row in zip(*[v if isinstance(v, list) else [v] for v in request.values()])]
    body = json.dumps({"dataframe_split": {"columns": columns, "data": rows}, "params": {"method": method}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_mlflow_models_serve_answers_with_images(tmp_path, registered):
    cfg, _, _ = registered
    port = free_port()
    # the server execs `uvicorn` by name: the venv's bin on PATH, as in an activated environment
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking.tracking_uri(cfg.tracking),
               PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}")
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", MODEL_URI,
                                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, proc, timeout=240)
        body = json.dumps({"dataframe_records": [{"num_images": 3}], "params": {"method": "euler-2"}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            images = np.asarray(json.loads(response.read())["predictions"])
        assert images.shape == (3, 1, 8, 8) and images.min() >= 0 and images.max() <= 255
        local = mlflow.pyfunc.load_model(MODEL_URI).predict(pd.DataFrame({"num_images": [3]}),
                                                            params={"method": "euler-2"})
        np.testing.assert_array_equal(images, local)
        for bad, reason in BAD_REQUESTS:
            status, answer = _post(port, bad)
            assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE", (bad, status, answer)
            assert answer["message"].splitlines()[-1].endswith(reason), (bad, answer["message"])
    except Exception:
        print(log.read_text(errors="replace")[-4000:])
        raise
    finally:
        _stop_group(proc)
