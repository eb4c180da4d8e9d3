"""mergescale: merge many fine-tuned experts with many methods and evaluate them, on Ray."""

__version__ = "0.2.0"
