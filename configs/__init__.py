"""ml_collections configs; pass a file to ``--config`` (``configs/f1.py``, ``configs/f1.py:lb``)."""
