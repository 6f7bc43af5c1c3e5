"""Tests of loomcfm_core.training, one module per module."""

# A network and run small enough for a CPU test, as ``--set`` overrides.
TINY = ["model.channels=32", "model.channel_mult=[1,2]", "model.attn_resolutions=[]", "train.batch_size=32",
        "data.num_workers=0", "train.log_every=5", "train.warmup_steps=5", "ray.cpus_per_worker=1"]
