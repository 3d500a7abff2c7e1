"""The built-in demo: a seeded corpus (`corpus.py`), the whole method end to end (`run.py`), its report."""
