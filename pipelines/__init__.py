"""KFP pipelines: the full LOOM-CFM pipeline and the reflow pipeline (from an existing checkpoint).

``loomcfm pipeline compile`` writes their packages to ``pipelines/compiled/`` — the YAML a user uploads in
the KFP UI; ``loomcfm pipeline run-local`` runs them with ``kfp.local``; ``loomcfm pipeline submit`` sends
them to a KFP endpoint.
"""
