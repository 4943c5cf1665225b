"""Analyses of a dataset against a model's set-up (anchor coverage and fitting)."""
