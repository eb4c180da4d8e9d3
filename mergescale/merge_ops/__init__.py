"""The merge math: pure torch functions on tensors, one file per method family. No Ray, no files.

Importing this package registers every method (see ``registry.py``).
"""

from mergescale.merge_ops import linear, model_stock, spherical, ties  # noqa: F401  (registration)
from mergescale.merge_ops.registry import METHODS, Method, MethodParams, TensorContext, get_method

__all__ = ["METHODS", "Method", "MethodParams", "TensorContext", "get_method"]
