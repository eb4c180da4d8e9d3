"""The merge math: pure torch functions on tensors, one file per method family. No Ray, no files.

Importing this package imports every module in it, which registers its methods (see
``registry.py``): adding a method is adding one file.  Look methods up with
``mergescale.methods.get_method``, which knows the data-driven methods too.
"""

import importlib
import pkgutil

from mergescale.merge_ops.registry import METHODS, Method, MethodParams, TensorContext, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "MethodParams", "TensorContext", "register"]
