"""Data pipeline: the synthetic default dataset, partition protocols, UniMatch views and torch datasets."""
