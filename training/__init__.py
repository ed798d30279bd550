"""Training entry points, one per family, on the shared skeleton in `trainer.py`."""
