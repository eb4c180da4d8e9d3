"""AWD's redundant vector disentangles (planted shared parts, the tiny zoo), at any scale, never worse than δ = 0."""

import itertools
import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergescale.checkpoints import ModelDir
from mergescale.cli import main
from mergescale.merge_ops.awd import disentangle, fit_delta, mean_abs_cos
from mergescale.orchestrator.jobs import _configs
from mergescale.specs import load_study_spec

ALPHA, STEPS, LR = 0.1, 300, 0.01  # the method's defaults


def direct_cos(taus, delta):
    """Mean |cos(τi − δ, τj − δ)| over pairs, computed on the vectors themselves (not through the Gram matrix)."""
    d = [t - delta for t in taus]
    cos = [torch.nn.functional.cosine_similarity(d[i], d[j], dim=0) for i in range(len(d)) for j in range(i)]
    return torch.stack(cos).abs().mean().item()


def direct_objective(taus, delta, alpha=ALPHA):
    mean_norm = torch.stack([t.norm() for t in taus]).mean()
    return direct_cos(taus, delta) + alpha * (delta.norm() / mean_norm).item()


def planted(scale, n=4, dim=2000, seed=0):
    """n task vectors sharing the component s (‖noise‖ = ‖s‖ / 2: pairwise |cos| ≈ 0.8), times ``scale``."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(dim, generator=g)
    return scale * s, [scale * (s + 0.5 * torch.randn(dim, generator=g)) for _ in range(n)]


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_recovers_a_planted_shared_component_at_any_scale(scale):
    s, taus = planted(scale)
    fit = disentangle(taus, ALPHA, STEPS, LR)
    delta = fit.delta(taus)
    assert torch.nn.functional.cosine_similarity(delta, s, dim=0) >= 0.9
    before, after = direct_cos(taus, torch.zeros_like(s)), direct_cos(taus, delta)
    assert before > 0.75 and after <= 0.5 * before
    # the diagnostics describe the returned δ
    assert fit.cos_before == pytest.approx(before, abs=1e-5) and fit.cos_after == pytest.approx(after, abs=1e-4)
    assert fit.delta_ratio == pytest.approx((delta.norm() / torch.stack(taus).norm(dim=1).mean()).item(), rel=1e-4)
    assert fit.objective_after == pytest.approx(direct_objective(taus, delta), abs=1e-4)
    assert mean_abs_cos(taus, delta).item() == pytest.approx(after, abs=1e-4)
    # scale-free: the same δ relative to the task vectors (up to rounding, which Adam's sign-like steps amplify)
    unit = fit_delta(planted(1.0)[1], ALPHA, STEPS, LR)
    assert (delta / scale - unit).norm() <= 0.02 * unit.norm()


def test_orthogonal_vectors_keep_delta_zero():
    q, _ = torch.linalg.qr(torch.randn(2000, 4, generator=torch.Generator().manual_seed(1)))
    taus = [q[:, i].clone() for i in range(4)]
    fit = disentangle(taus, ALPHA, STEPS, LR)
    delta = fit.delta(taus)
    assert torch.equal(delta, torch.zeros(2000)) and fit.best_step == 0
    assert fit.objective_after == fit.objective_before


def test_nearly_orthogonal_vectors_need_almost_no_delta():
    g = torch.Generator().manual_seed(2)
    taus = [torch.randn(2000, generator=g) for _ in range(4)]  # |cos| ≈ 0.02
    fit = disentangle(taus, ALPHA, STEPS, LR)
    delta = fit.delta(taus)
    assert fit.delta_ratio <= 0.05
    assert direct_objective(taus, delta) <= direct_objective(taus, torch.zeros(2000))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lr", [0.01, 0.3, 10.0])
def test_the_fit_is_never_worse_than_delta_zero(seed, lr):
    g = torch.Generator().manual_seed(10 + seed)
    shared = torch.randn(300, generator=g) * seed / 2  # from independent to strongly shared
    taus = [shared + torch.randn(300, generator=g) * (i + 1) for i in range(3 + seed)]
    fit = disentangle(taus, ALPHA, 20, lr)
    delta = fit.delta(taus)
    assert fit.objective_after <= fit.objective_before
    assert direct_objective(taus, delta) <= direct_objective(taus, torch.zeros(300)) + 1e-6


def test_a_fit_that_only_overshoots_falls_back_to_zero():
    """Adam's first steps move each coefficient by ~lr: at lr 10 every iterate is worse than δ = 0."""
    g = torch.Generator().manual_seed(3)
    taus = [torch.randn(2000, generator=g) for _ in range(4)]
    fit = disentangle(taus, ALPHA, 3, 10.0)
    delta = fit.delta(taus)
    assert fit.best_step == 0 and torch.equal(delta, torch.zeros(2000))
    assert fit.objective_after == fit.objective_before and fit.cos_after == fit.cos_before


def test_fewer_than_two_or_zero_task_vectors_give_zero():
    assert torch.equal(fit_delta([torch.ones(5)], ALPHA, STEPS, LR), torch.zeros(5))
    assert torch.equal(fit_delta([torch.zeros(5), torch.zeros(5)], ALPHA, STEPS, LR), torch.zeros(5))


def test_deterministic():
    _, taus = planted(1.0, n=5, seed=4)
    a, b = fit_delta(taus, ALPHA, STEPS, LR), fit_delta([t.clone() for t in taus], ALPHA, STEPS, LR)
    assert a.numpy().tobytes() == b.numpy().tobytes()


def task_vectors(zoo, experts):
    """Whole-model task vectors: every float tensor, expert − base in fp32, flattened in tensor-name order."""
    base = load_file(zoo.base / "model.safetensors")
    names = sorted(n for n, t in base.items() if t.is_floating_point())
    out = []
    for expert in experts:
        tensors = load_file(zoo.experts[expert] / "model.safetensors")
        out.append(torch.cat([(tensors[n].float() - base[n].float()).reshape(-1) for n in names]))
    return out


@pytest.mark.zoo
def test_disentangles_every_zoo_pair(tiny_zoo):
    """The issue's bounds on all 28 pairs: mean |cos| falls by ≥ 50 % with ‖δ‖ ≤ 0.5 ‖τ‖ (the smaller τ)."""
    names = sorted(tiny_zoo.experts)
    every = dict(zip(names, task_vectors(tiny_zoo, names), strict=True))
    failed = []
    for pair in itertools.combinations(names, 2):
        taus = [every[e] for e in pair]
        fit = disentangle(taus, ALPHA, STEPS, LR)
        delta = fit.delta(taus)
        before, after = direct_cos(taus, torch.zeros_like(delta)), direct_cos(taus, delta)
        ratio = (delta.norm() / min(t.norm() for t in taus)).item()
        print(f"{'+'.join(pair)}: mean |cos| {before:.4f} -> {after:.4f}, ‖δ‖/min‖τ‖ {ratio:.4f}")
        if not (after <= 0.5 * before and ratio <= 0.5):
            failed.append(pair)
    assert not failed, failed


@pytest.mark.zoo
def test_disentangles_all_eight_zoo_experts(tiny_zoo):
    taus = task_vectors(tiny_zoo, sorted(tiny_zoo.experts))
    assert len(taus) == 8
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the merge's driver does
    try:
        start = time.perf_counter()
        fit = disentangle(taus, ALPHA, STEPS, LR)
        delta = fit.delta(taus)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    print(f"8 experts, {taus[0].numel()} parameters: mean |cos| {fit.cos_before:.4f} -> {fit.cos_after:.4f}, "
          f"‖δ‖/mean‖τ‖ {fit.delta_ratio:.4f}, objective {fit.objective_before:.4f} -> {fit.objective_after:.4f}, "
          f"{seconds:.2f} s")  # fmt: skip
    assert fit.objective_after < fit.objective_before
    assert direct_cos(taus, delta) < direct_cos(taus, torch.zeros_like(taus[0]))
    assert fit.delta_ratio <= 0.5


def card_stats(out) -> dict:
    """The JSON block of the model card's statistics section."""
    card = (out / "README.md").read_text()
    return json.loads(card.split("## Statistics passes")[1].split("```json\n")[1].split("```")[0])


@pytest.mark.zoo
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_the_model_card_records_the_fit(tiny_zoo, tmp_path, scope):
    """A real `mergescale merge` of two zoo experts writes the fit's diagnostics into README.md, and they
    describe the δ the merged weights show (global) or each tensor's own fit (tensor)."""
    pair = ("upper", "rot13")
    spec = tmp_path / "awd.yaml"
    spec.write_text(yaml.safe_dump({"method": "awd", "base": str(tiny_zoo.base),
                                    "experts": [str(tiny_zoo.experts[e]) for e in pair],
                                    "parameters": {"lambda": 0.5, "scope": scope}}))  # fmt: skip
    assert main(["merge", str(spec), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    stats = card_stats(tmp_path / "out")
    assert stats.pop("scope") == scope
    base = load_file(tiny_zoo.base / "model.safetensors")
    names = sorted(n for n, t in base.items() if t.is_floating_point())
    if scope == "global":
        (fitted,) = stats.values()
        taus = task_vectors(tiny_zoo, pair)
        merged = ModelDir(tmp_path / "out")
        # out − θ0 = λ (τ1 + τ2 − 2δ): δ read back from the weights
        moved = torch.cat([(merged.tensor(n).float() - base[n].float()).reshape(-1) for n in names])
        delta = (taus[0] + taus[1] - moved / 0.5) / 2
        assert fitted["mean_abs_cos"][0] == pytest.approx(direct_cos(taus, torch.zeros_like(delta)), abs=1e-5)
        assert fitted["mean_abs_cos"][1] == pytest.approx(direct_cos(taus, delta), abs=1e-3)
        assert fitted["mean_abs_cos"][1] <= 0.5 * fitted["mean_abs_cos"][0]
        mean_norm = torch.stack(taus).norm(dim=1).mean()
        assert fitted["delta_norm_ratio"] == pytest.approx((delta.norm() / mean_norm).item(), abs=1e-3)
        assert fitted["objective"][1] < fitted["objective"][0] and 0 < fitted["best_step"] <= STEPS
    else:
        assert sorted(stats) == names
        name = "model.layers.0.mlp.up_proj.weight"
        experts = [load_file(tiny_zoo.experts[e] / "model.safetensors")[name].float() for e in pair]
        own = disentangle([(e - base[name].float()).reshape(-1) for e in experts], ALPHA, STEPS, LR).summary()
        assert stats[name] == own  # the same Gram matrix, the same fit
        assert all(s["objective"][1] <= s["objective"][0] for s in stats.values())


def test_the_alpha_sweep_example_is_one_job_per_alpha():
    """examples/awd_alpha.yaml: the paper's α sweep as a study grid, next to task arithmetic at the same λ."""
    spec = load_study_spec(Path(__file__).parents[1] / "examples" / "awd_alpha.yaml")
    configs = {label: (method, params) for method, label, params in _configs(spec)}
    awd = [params["alpha"] for method, params in configs.values() if method == "awd"]
    assert awd == [1e-2, 1e-3, 1e-4, 1e-5, 1e-6]  # floats: `1e-2` unquoted without a dot is a YAML string
    assert configs["task_arithmetic"][1]["lambda"] == configs["awd alpha=1e-06"][1]["lambda"]
