"""Evaluation: how far a checkpoint's samples are from the data, per sampling method, and what is recorded.

``scoring`` (the evaluate stage's work: sample every method, distances, grids, ``results.json``) ·
``samples`` (every method's samples and their features, on ``ray.num_workers`` workers) · ``metrics`` (the
Fréchet distance, the feature networks, the reference statistics) · ``feature_weights`` (the feature
networks' weights: TF-Inception in storage, the digits classifier beside its dataset) · ``plot`` (distance
vs NFE) · ``summary`` (a pipeline's base-vs-reflow result on its parent MLflow run).
"""
