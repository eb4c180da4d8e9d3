"""Data-driven merge methods (``docs/ALGORITHMS.md#data-driven-methods``): a *fit* step, then the ordinary map.

A data-driven method is one file here: its parameters, its ``fit`` (forward passes — and, for
DivMerge and AdaMerging, gradients with respect to the merge coefficients — of torch models on
inputs drawn from each expert's lm-eval task) and its per-tensor ``merge``.  The fit produces either
coefficients (one per expert and tensor: θ = θ0 + Σ c τ) or per-expert statistics tensors (RegMean's
Gram matrices, Fisher diagonals) written to a directory; the sharded engine then writes the model.

Code here reads model files and runs torch; it knows nothing of Ray (``orchestrator/fit.py`` runs a
fit as a Ray task and prepares its inputs with the evaluator pool).
"""

from mergescale.fit import adamerging, divmerge, fisher, regmean, slta  # noqa: F401  (register the methods)
