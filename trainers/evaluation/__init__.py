"""Evaluation: task metrics (`metrics/`, loadable with `evaluate.load`), retrieval recall, benchmarking."""
