"""Tests of loomcfm_core.evaluation, one module per module."""
