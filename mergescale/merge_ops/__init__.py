"""The merge math: pure torch functions on tensors, one file per method family. No Ray, no files.

Importing this package registers every method (see ``registry.py``).
"""

from mergescale.merge_ops import awd, linear, metagpt, model_stock, spherical, svd, ties  # noqa: F401  (registration)
from mergescale.merge_ops.registry import METHODS, Method, MethodParams, TensorContext, get_method

__all__ = ["METHODS", "Method", "MethodParams", "TensorContext", "get_method"]
