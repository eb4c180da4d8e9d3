"""Merge methods on small tensors: hand-computed expectations and properties."""

import math
from dataclasses import replace

import pytest
import torch

from mergescale.errors import SpecError
from mergescale.fit.method import FitState
from mergescale.merge_ops import METHODS, TensorContext
from mergescale.merge_ops import sparsify as sp
from mergescale.methods import get_method  # registers the data-driven methods too: all are parametrized below

CTX = TensorContext("model.layers.0.mlp.up_proj.weight", seed=0)


def run(name, base, experts, per_expert=None, ctx=CTX, **params):
    """Merge one tensor, running the method's statistics passes over this one tensor first."""
    m = get_method(name)
    per_expert = per_expert or [{} for _ in experts]
    ps = [m.Params.model_validate({**params, **pe}) for pe in per_expert]
    for step in range(m.stats_passes(ps)):
        stats = m.tensor_stats(step, base, experts, ps, ctx)
        ctx = replace(ctx, stats=m.reduce(step, {ctx.name: stats}, ctx.stats))
    return m.merge(base, experts, ps, ctx)


def test_linear_and_task_arithmetic():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert torch.equal(run("linear", None, [a, b], [{"weight": 1}, {"weight": 3}]), torch.tensor([2.5, 5.0]))
    assert torch.equal(run("linear", None, [a, b], normalize=False), torch.tensor([4.0, 8.0]))
    base = torch.tensor([1.0, 1.0])
    assert torch.equal(run("task_arithmetic", base, [a, b], **{"lambda": 0.5}), torch.tensor([2.0, 4.0]))
    # negation (weight −1) and an analogy C + B − A
    assert torch.equal(run("task_arithmetic", base, [a], [{"weight": -1}]), torch.tensor([1.0, 0.0]))
    c = torch.tensor([0.0, 5.0])
    got = run("task_arithmetic", base, [c, b, a], [{"weight": 1}, {"weight": 1}, {"weight": -1}])
    assert torch.equal(got, c + b - a)


def test_ties_trims_elects_signs_and_takes_the_disjoint_mean():
    base = torch.zeros(4)
    e1 = torch.tensor([1.0, -2.0, 3.0, 0.5])
    e2 = torch.tensor([-1.0, 1.0, 2.0, -4.0])
    # top-50 %: e1 -> [0, -2, 3, 0], e2 -> [0, 0, 2, -4]; signs of the sums: +, -, +, -
    got = run("ties", base, [e1, e2], density=0.5)
    assert torch.equal(got, torch.tensor([0.0, -2.0, 2.5, -4.0]))
    # without trimming: element 0 sums to 0 -> sign +, only e1's +1 agrees
    got = run("ties", base, [e1, e2], density=1.0)
    assert torch.equal(got, torch.tensor([1.0, -2.0, 2.5, -4.0]))
    # normalize=false sums the agreeing values instead of averaging them
    got = run("ties", base, [e1, e2], density=1.0, normalize=False)
    assert torch.equal(got, torch.tensor([1.0, -2.0, 5.0, -4.0]))


def test_dare_ties_is_dare_then_the_ties_election_and_disjoint_mean_by_hand():
    """mergescale's dare_ties: drop each entry with probability 1 − d (the seeded masks), rescale the survivors
    by 1/d, elect the sign of the weighted sum, average the agreeing entries over their weights; θ0 + λ·m."""
    base = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, -0.5, 0.25, 3.0])
    taus = [torch.tensor([1.0, -2.0, 3.0, 0.5, -1.5, 2.5, -0.75, 1.25]),
            torch.tensor([-1.0, 1.0, 2.0, -4.0, 0.5, -3.0, 1.75, -2.0])]  # fmt: skip
    w, d, lam = [0.7, 0.4], 0.5, 0.8
    masks = [(torch.rand(8, generator=CTX.generator(i)) < d).tolist() for i in range(2)]
    assert all(any(m) and not all(m) for m in masks)  # some dropped, some kept: the masks matter
    want = []
    for j in range(8):
        kept = [taus[i][j].item() / d if masks[i][j] else 0.0 for i in range(2)]
        sign = 1.0 if sum(w[i] * kept[i] for i in range(2)) >= 0 else -1.0
        agree = [i for i in range(2) if kept[i] * sign > 0]
        total = sum(w[i] * kept[i] for i in agree)
        want.append(base[j].item() + lam * total / (sum(w[i] for i in agree) or 1.0))
    got = run("dare_ties", base, [base + t for t in taus], [{"weight": w[0]}, {"weight": w[1]}], density=d,
              **{"lambda": lam})  # fmt: skip
    assert torch.allclose(got, torch.tensor(want), rtol=0, atol=1e-6), (got, want)


def test_topk_is_exact_with_ties_broken_by_index():
    x = torch.tensor([1.0, -3.0, 3.0, 2.0, 3.0, 0.0])
    assert sp.topk_mask(x, 0.5).tolist() == [False, True, True, False, True, False]
    assert sp.topk_mask(x, 2 / 6).tolist() == [False, True, True, False, False, False]
    assert int(sp.topk_mask(torch.randn(1000), 0.2).sum()) == 200


def test_dare_is_unbiased_over_seeds_and_seeded_by_tensor_name():
    base = torch.zeros(2000)
    expert = torch.randn(2000, generator=torch.Generator().manual_seed(1))
    outs = torch.stack(
        [run("dare_linear", base, [expert], ctx=TensorContext("w", seed=s), density=0.3) for s in range(300)]
    )
    kept = (outs[0] != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.05
    assert torch.allclose(outs[0][outs[0] != 0], expert[outs[0] != 0] / 0.3)
    assert (outs.mean(0) - expert).abs().mean() < 0.1 * expert.abs().mean()
    again = run("dare_linear", base, [expert], ctx=TensorContext("w", seed=0), density=0.3)
    assert torch.equal(again, outs[0])
    other = run("dare_linear", base, [expert], ctx=TensorContext("v", seed=0), density=0.3)
    assert not torch.equal(other, outs[0])


def test_breadcrumbs_drops_outliers_and_the_smallest():
    x = torch.arange(1, 101, dtype=torch.float32)
    mask = sp.breadcrumbs_mask(x, density=0.9, gamma=0.01)
    assert mask.sum() == 90
    assert not mask[-1] and not mask[:9].any() and mask[9:99].all()
    got = run("breadcrumbs", torch.zeros(100), [x], density=0.9, gamma=0.01)
    assert torch.equal(got, x * mask)


def test_della_keep_probability_rises_with_magnitude_rank():
    x = torch.tensor([[0.1, -0.4, 0.3, 0.2, -0.5]])
    p = sp.della_probs(x, density=0.5, epsilon=0.2)
    ranks = torch.tensor([[0, 3, 2, 1, 4]], dtype=torch.float32)
    assert torch.allclose(p, 0.3 + 0.4 * ranks / 4)
    big = torch.randn(200, 300, generator=torch.Generator().manual_seed(0))
    out = run("della_linear", torch.zeros_like(big), [big], density=0.7, epsilon=0.14)
    assert abs((out != 0).float().mean().item() - 0.7) < 0.02
    kept = out != 0
    probs = sp.della_probs(big, 0.7, 0.14)
    assert torch.allclose(out[kept], big[kept] / probs[kept])


def test_model_stock_t_follows_the_agreement_of_task_vectors():
    base = torch.zeros(2)
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # orthogonal task vectors: c = 0 -> t = 0 -> the base
    assert torch.equal(run("model_stock", base, [e1, e2]), base)
    # cos = 0.6 -> t = 2*0.6 / 1.6 = 0.75
    e3 = torch.tensor([0.6, 0.8])
    got = run("model_stock", base, [e1, e3])
    assert torch.allclose(got, 0.75 * (e1 + e3) / 2)
    # opposite task vectors: t < 0 is clamped to 0 (mergekit semantics keep it)
    assert torch.equal(run("model_stock", base, [e1, -e1]), base)


def test_slerp_endpoints_and_midpoint():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(run("slerp", a, [b], t=0.0), a)
    assert torch.allclose(run("slerp", a, [b], t=1.0), b)
    assert torch.allclose(run("slerp", a, [b], t=0.5), torch.tensor([1.0, 1.0]) / math.sqrt(2))
    # (anti)parallel inputs fall back to linear interpolation
    assert torch.allclose(run("slerp", a, [2 * a], t=0.5), 1.5 * a)


def test_karcher_and_multislerp_on_orthogonal_vectors():
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    want = torch.tensor([1.0, 1.0]) * (2 / math.sqrt(2))
    assert torch.allclose(run("karcher", None, [a, b]), want, atol=1e-5)
    assert torch.allclose(run("multislerp", None, [a, b]), want, atol=1e-5)
    got = run("nuslerp", None, [a, b], [{"weight": 1}, {"weight": 1}])
    assert torch.allclose(got, want, atol=1e-5)


#: methods whose default combines task vectors by a plain sum (no normalization, no election)
SUMMING = {"task_arithmetic", "dare_linear", "breadcrumbs", "della_linear"}


#: where "identical experts give the expert" does not hold, by the method's definition
NOT_IDEMPOTENT = {
    "iso_c": "flattens the spectrum of the summed task matrix",
    "iso_cts": "flattens the spectrum",
    "tsv": "keeps 1/n of each task's spectrum",
    "transfer": "its two inputs are a fine-tune and its base, not experts",
    "random_direction": "a random direction of the task vector's norm, not the task vector",
    "arcee_fusion": "keeps only the outliers of importance, not the whole change",
    "awd": "removes what the task vectors share, which for identical experts is most of them",
}


@pytest.mark.parametrize("name", sorted(set(METHODS) - set(NOT_IDEMPOTENT)))
def test_identical_experts_give_the_expert(name):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 16, generator=g)
    expert = base + 0.01 * torch.randn(8, 16, generator=g)
    m = get_method(name)
    n = m.n_experts or 3
    params = {"t": 1.0} if name in ("slerp", "nearswap") else {}  # nearswap: t above every difference
    if "density" in m.Params.model_fields:
        params["density"] = 1.0  # keep every entry (DELLA: with probability exactly 1)
        if "epsilon" in m.Params.model_fields:
            params["epsilon"] = 0.0
    ctx = CTX
    if m.data_driven and m.needs_base:  # a coefficient map: fitted coefficients that sum to one
        ctx = replace(CTX, stats=FitState({CTX.name: [1.0 / n] * n}, ()))
    got = run(name, base if m.needs_base else None, [expert.clone() for _ in range(n)], ctx=ctx, **params)
    want = base + n * (expert - base) if name in SUMMING else expert
    assert torch.allclose(got, want, atol=1e-5), name


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs", "linear"])
def test_one_expert_with_weight_one_gives_the_expert(name):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(32, generator=g)
    expert = base + torch.randn(32, generator=g)
    fields = get_method(name).Params.model_fields
    params = {"density": 1.0} if "density" in fields else {}
    params |= {"epsilon": 0.0} if "epsilon" in fields else {}  # DELLA keeps every entry with probability 1
    assert torch.allclose(run(name, base, [expert], **params), expert, atol=1e-6)


def test_results_do_not_depend_on_tensor_order():
    g = torch.Generator().manual_seed(2)
    tensors = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(16, 16, generator=g) for i in range(4)}
    base = {k: torch.zeros_like(v) for k, v in tensors.items()}

    def merge_all(order):
        return {
            k: run("dare_ties", base[k], [tensors[k], -tensors[k] * 0.5], ctx=TensorContext(k, seed=7)) for k in order
        }

    names = list(tensors)
    a, b = merge_all(names), merge_all(reversed(names))
    assert all(torch.equal(a[k], b[k]) for k in names)


def test_spectral_methods_on_diagonal_task_matrices():
    base = torch.zeros(4, 4)
    t1, t2 = torch.diag(torch.tensor([4.0, 0, 1, 0])), torch.diag(torch.tensor([0, 3.0, 0, 0.5]))
    # Iso-C: the summed spectrum (4, 3, 1, .5) flattened to its mean 2.125
    assert torch.allclose(run("iso_c", base, [t1, t2]), 2.125 * torch.eye(4), atol=1e-5)
    # Iso-CTS, common = 0.5: common directions e1, e2; task directions e3 (task 1) and e4 (task 2)
    assert torch.allclose(run("iso_cts", base, [t1, t2], common=0.5), 2.125 * torch.eye(4), atol=1e-5)
    # TSV: each task keeps its top 4/2 = 2 singular triplets; the bases are orthogonal already
    assert torch.allclose(run("tsv", base, [t1, t2]), t1 + t2, atol=1e-5)
    assert torch.allclose(run("tsv", base, [t1, t2], alpha=0.5), 0.5 * (t1 + t2), atol=1e-5)
    # vectors (norms, biases) take the mean task vector
    v = torch.tensor([1.0, 3.0])
    assert torch.allclose(run("iso_c", torch.zeros(2), [v, -v]), torch.zeros(2))


@pytest.mark.parametrize("shape", [(6, 6), (8, 6), (6, 8)])
def test_spectral_bases_are_orthonormal_when_the_tasks_share_directions(shape):
    """TSV merges U⊥ diag(s) V⊥ᵀ: s = each task's top 1/n singular values, U⊥ and V⊥ the orthogonalized
    concatenations of their singular vectors. Its singular values are exactly s iff U⊥ and V⊥ are
    orthonormal. Iso-CTS merges c · U⊥ V⊥ᵀ: its spectrum is flat iff its joined bases are orthonormal."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    tasks = [a, a + 0.1 * b]  # nearly the same singular vectors: the concatenated bases are far from orthogonal
    k = min(shape) // 2
    kept = torch.cat([torch.linalg.svdvals(t)[:k] for t in tasks]).sort(descending=True).values
    tsv = torch.linalg.svdvals(run("tsv", torch.zeros(shape), tasks))
    assert torch.allclose(tsv, kept, rtol=1e-5, atol=1e-5), (tsv, kept)
    # Iso-CTS, common 0.5 of rank 6: 3 common directions and 1 per task, 5 equal singular values
    iso = torch.linalg.svdvals(run("iso_cts", torch.zeros(shape), tasks, common=0.5))
    assert torch.allclose(iso[:5], iso[:5].mean().expand(5), rtol=1e-5) and iso[5] < 1e-5, iso


def test_transfer_adds_the_source_fine_tuning_difference():
    target = torch.tensor([1.0, 2.0])
    src_ft, src_base = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 1.0])
    got = run("transfer", target, [src_ft, src_base], **{"lambda": 2.0})
    assert torch.allclose(got, target + 2.0 * (src_ft - src_base))


def test_metagpt_coefficients_are_norm_shares_summing_to_one():
    base = torch.zeros(3)
    e1, e2 = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    m = get_method("metagpt")
    ps = [m.Params()] * 2
    lam = m.reduce(
        0, {"a": m.tensor_stats(0, base, [e1, e2], ps, CTX), "b": m.tensor_stats(0, base, [e2, e2], ps, CTX)}, None
    )
    # ‖τ1‖² = 9 + 1, ‖τ2‖² = 1 + 1 over the two tensors
    assert lam == pytest.approx([10 / 12, 2 / 12]) and sum(lam) == pytest.approx(1.0)
    assert torch.allclose(run("metagpt", base, [e1, e2]), torch.tensor([0.9 * 3, 0.1, 0.0]))


def test_global_ties_keeps_exactly_the_top_k_of_the_whole_task_vector():
    from mergescale.merge_ops.registry import TensorContext

    g = torch.Generator().manual_seed(3)
    shapes = {"a.weight": (40, 30), "b.weight": (30,), "c.weight": (25, 25)}
    base = {n: torch.zeros(s) for n, s in shapes.items()}
    e = {n: torch.randn(s, generator=g).round(decimals=1) for n, s in shapes.items()}  # many equal magnitudes
    m = get_method("ties")
    ps = [m.Params(density=0.3, scope="global")]
    state = None
    for step in range(m.stats_passes(ps)):
        per = {n: m.tensor_stats(step, base[n], [e[n]], ps, TensorContext(n, stats=state)) for n in shapes}
        state = m.reduce(step, per, state)
    kept = {n: m.merge(base[n], [e[n]], ps, TensorContext(n, stats=state)) != 0 for n in shapes}
    flat = torch.cat([e[n].reshape(-1) for n in sorted(shapes)])
    want = sp.topk_mask(flat, 0.3)
    got = torch.cat([kept[n].reshape(-1) for n in sorted(shapes)]) | (flat == 0) & want
    assert int(want.sum()) == int(0.3 * flat.numel())
    assert torch.equal(got, want)


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_ties_keeps_the_exact_top_k_when_ties_at_the_threshold_span_the_chunks(scope):
    """A tensor of several CHUNKs whose magnitudes tie massively at the k-th value: the first of the equal
    ones in flat order are kept, across the chunk boundaries (the trimming runs chunk by chunk)."""
    from mergescale.merge_ops.registry import TensorContext
    from mergescale.merge_ops.ties import CHUNK

    g = torch.Generator().manual_seed(5)
    e = torch.randn(3 * CHUNK // 200 + 7, 200, generator=g).round(decimals=1)  # ~40 distinct magnitudes
    base = torch.zeros_like(e)
    m = get_method("ties")
    ps = [m.Params(density=0.37, scope=scope)]
    state = None
    for step in range(m.stats_passes(ps)):
        state = m.reduce(step, {"w": m.tensor_stats(step, base, [e], ps, TensorContext("w", stats=state))}, state)
    got = m.merge(base, [e], ps, TensorContext("w", stats=state))
    want = sp.topk_mask(e, 0.37)
    thr = e.abs()[want].min()
    assert int((e.abs() == thr).sum()) > int((e.abs() == thr)[want].sum()) > 0  # a tie is broken here
    assert torch.equal(got != 0, want & (e != 0)) and torch.equal(got[want], e[want])


def test_ties_float_only_divisor_floor_is_the_comparison_exactly():
    """_below stands in for `torch.where(x.abs() < c, 1, 0)` (bool kernels are slow on CPU): the same values
    at, just below and just above c, at ±0, far away and at NaN."""
    from mergescale.merge_ops.ties import _TINY, _below

    c = torch.tensor(_TINY)
    near = torch.stack([c, c.nextafter(torch.tensor(0.0)), c.nextafter(torch.tensor(1.0))])
    x = torch.cat([near, -near, torch.tensor([0.0, -0.0, 1e-30, 3.0, -1e30, 3e38, float("nan")])])
    want = torch.where(x.abs() < 1e-8, 1.0, 0.0)
    want[-1] = float("nan")
    assert torch.equal(_below(x, _TINY)[:-1], want[:-1]) and _below(x, _TINY)[-1].isnan()


@pytest.mark.parametrize("weights", [[0.3, 0.3, 0.3], [0.7, 0.0, 1e-3], [1.0, -1.0, 0.5], [1e-9, 0.4, 0.4]])
def test_ties_combine_is_the_elected_disjoint_mean(weights):
    """combine against the formula written directly (the sign of Σ w τ, entries whose w τ agrees, the
    mean over their weights, an empty divisor read as 1), on task vectors with many zeros so that some
    elements keep nothing; the clamp shortcut for non-cancelling weights gives the general path's bytes."""
    from mergescale.merge_ops.ties import _combine, combine

    g = torch.Generator().manual_seed(11)
    base = torch.randn(5000, generator=g)
    taus = [torch.randn(5000, generator=g) * (torch.rand(5000, generator=g) < 0.4) for _ in weights]
    w = torch.tensor(weights).reshape(-1, 1)
    t = torch.stack(taus)
    sign = torch.where((w * t).sum(0) >= 0, 1.0, -1.0)
    agree = (w * t * sign) > 0
    divisor = (w * agree).sum(0)
    divisor = torch.where(divisor.abs() < 1e-8, 1.0, divisor)
    want = base + 0.8 * (w * t * agree).sum(0) / divisor
    got = combine(base, taus, weights, elect=True, normalize=True, lam=0.8)
    assert (divisor == 1).any() and torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    if all(x >= 1e-8 or x == 0 for x in weights):
        general = _combine(base, taus, [float(x) for x in weights], True, True, 0.8, disjoint=False)
        assert torch.equal(got, general)


def test_awd_lowers_the_mean_absolute_cosine():
    from mergescale.merge_ops.awd import fit_delta, mean_abs_cos

    g = torch.Generator().manual_seed(4)
    shared = torch.randn(500, generator=g)
    taus = [shared + 0.5 * torch.randn(500, generator=g) for _ in range(4)]
    before = mean_abs_cos(taus, torch.zeros(500))
    delta = fit_delta(taus, alpha=0.1, steps=300, lr=0.01)
    assert mean_abs_cos(taus, delta) < 0.5 * before
    assert torch.nn.functional.cosine_similarity(delta, shared, dim=0) > 0.8
    # tensor scope merges with that δ removed
    base = torch.zeros(500)
    got = run("awd", base, taus, scope="tensor", **{"lambda": 0.5})
    assert torch.allclose(got, 0.5 * sum(t - delta for t in taus), atol=1e-5)


def test_unknown_method_is_a_user_error():
    with pytest.raises(SpecError, match="unknown merge method 'tie'; known: .*ties"):
        get_method("tie")
