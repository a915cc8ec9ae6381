"""The run core every trainer shares: typed configs (``config``), checkpoints (``checkpoint``),
the run log (``log``), the learning-rate rule (``lr``), EMA (``ema``) and precision (``precision``)."""
