"""Data pipeline: dataset specs and readers (synthetic, Pascal VOC, Cityscapes), partition protocols and published
split fingerprints, UniMatch views, torch datasets, and the data checks (``check.py``, ``sslray data check``)."""
