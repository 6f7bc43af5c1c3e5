"""Kubernetes objects the package launches itself, shipped as package data (``train-rayjob.yaml``)."""
