"""The code MLflow logs with the registered generator (MLflow's "models from code"): loading the model runs
this file, which names :class:`loomcfm_core.serving.Generator` from the installed ``loomcfm``, instead of
unpickling an object that CloudPickle serialised (which MLflow warns about, rightly, on every registration)."""

from mlflow.models import set_model

from loomcfm_core.serving import Generator

set_model(Generator())
