"""Divergences between next-token distributions (``docs/ALGORITHMS.md#js-and-kl-divergences``).

Inputs are log-probabilities over the full vocabulary, one row per position; everything is fp32,
probabilities are clipped at 1e-12.  Written with differentiable torch operations: data-driven
merging minimises the same quantities with respect to merge coefficients.
"""

from __future__ import annotations

import torch

CLIP = 1e-12


def kl_rows(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) of each row (position)."""
    p = p_logp.float().exp().clamp_min(CLIP)
    q = q_logp.float().exp().clamp_min(CLIP)
    return (p * (p.log() - q.log())).sum(-1)


def js_rows(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence of each row: ½ KL(p ‖ m) + ½ KL(q ‖ m), m = (p + q) / 2 (natural log)."""
    p = p_logp.float().exp().clamp_min(CLIP)
    q = q_logp.float().exp().clamp_min(CLIP)
    log_m = (0.5 * (p + q)).log()
    return 0.5 * (p * (p.log() - log_m)).sum(-1) + 0.5 * (q * (q.log() - log_m)).sum(-1)


def example_divergences(p_logp: torch.Tensor, q_logp: torch.Tensor) -> tuple[float, float]:
    """(JS, KL(p ‖ q)) of one example: the mean over its positions."""
    return float(js_rows(p_logp, q_logp).mean()), float(kl_rows(p_logp, q_logp).mean())
