"""Kubernetes objects the package creates itself (by the RayJob launcher), shipped as package data
(``train-rayjob.yaml``)."""
