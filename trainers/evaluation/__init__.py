"""Evaluation: the evaluation routine of each task (`tasks`), task metrics (`metrics/`, loadable with
`evaluate.load`), retrieval recall, benchmarking."""
