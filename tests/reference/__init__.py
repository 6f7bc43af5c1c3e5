"""Tests of loomcfm_core.reference: the reference implementation's flags and configs."""
