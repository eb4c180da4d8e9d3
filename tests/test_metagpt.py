"""MetaGPT where it differs from averaging: experts whose task vectors differ in norm by orders of
magnitude (on the zoo all norms are 4.75–5.05, so λ ≈ 1/n and MetaGPT looks like averaging)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_mergekit_random import write_model

from mergescale.checkpoints import ModelDir
from mergescale.zoo.synthetic import qwen2_tensors

CFG = {"vocab_size": 40, "hidden_size": 24, "num_hidden_layers": 2, "intermediate_size": 40,
       "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip
SCALES = (1e-3, 1e-2, 4e-2)  # task-vector RMS of the three experts: squared norms 1 : 100 : 1600
MERGESCALE = Path(sys.executable).parent / "mergescale"


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("metagpt")
    gen = torch.Generator().manual_seed(11)
    base = {n: 0.02 * torch.randn(s, generator=gen) for n, s in qwen2_tensors(CFG).items()}
    experts = []
    for i, s in enumerate(SCALES):
        tensors = {n: t + s * torch.randn(t.shape, generator=gen) for n, t in base.items()}
        experts.append(write_model(root / f"e{i}", CFG, tensors))
    return write_model(root / "base", CFG, base), experts


def test_metagpt_weights_experts_by_their_share_of_the_squared_norms(family, tmp_path):
    """Through the real CLI: λt = ‖τt‖² / Σk ‖τk‖² over the whole model (by hand, fp64, every tensor
    counted once), far from 1/3; the merge is θ0 + Σ λt τt in every tensor and is not the average."""
    base_dir, expert_dirs = family
    spec = tmp_path / "metagpt.yaml"
    spec.write_text(yaml.safe_dump({"method": "metagpt", "base": str(base_dir),
                                    "experts": [str(e) for e in expert_dirs]}))  # fmt: skip
    out = tmp_path / "merged"
    res = subprocess.run([str(MERGESCALE), "merge", str(spec), "--out", str(out)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr

    base, experts, merged = ModelDir(base_dir), [ModelDir(e) for e in expert_dirs], ModelDir(out)
    names = base.names
    sq = [sum(float((e.tensor(n).double() - base.tensor(n).double()).square().sum()) for n in names)
          for e in experts]  # fmt: skip
    lam = [s / sum(sq) for s in sq]
    assert lam[0] < 1e-3 and lam[2] > 0.9  # very unlike 1/3 each
    assert sum(lam) == pytest.approx(1.0)
    worst_vs_average = 0.0
    for n in names:
        b = base.tensor(n).double()
        taus = [e.tensor(n).double() - b for e in experts]
        want = b + sum(w * t for w, t in zip(lam, taus, strict=True))
        got = merged.tensor(n).double()
        assert torch.allclose(got, want.float().double(), atol=1e-6, rtol=0), n
        average = b + sum(taus) / len(taus)
        worst_vs_average = max(worst_vs_average, float((got - average).abs().max()))
    assert worst_vs_average > 1e-2  # averaging would move the 4e-2-RMS expert's entries by a third only


def test_metagpt_per_tensor_scope_uses_each_tensors_own_shares(family, tmp_path):
    """``scope: tensor`` (non-canonical): the shares come from each tensor alone (their sampling noise
    around the global shares moves every tensor by at least 1.8e-5, far above the tolerance)."""
    from mergescale.orchestrator.merge import run_merge
    from mergescale.specs import load_merge_spec

    base_dir, expert_dirs = family
    spec = tmp_path / "metagpt.yaml"
    experts = [str(e) for e in expert_dirs]
    spec.write_text(yaml.safe_dump({"method": "metagpt", "base": str(base_dir), "experts": experts,
                                    "parameters": {"scope": "tensor"}}))  # fmt: skip
    run_merge(load_merge_spec(spec), tmp_path / "merged", progress=False)
    base, experts, merged = ModelDir(base_dir), [ModelDir(e) for e in expert_dirs], ModelDir(tmp_path / "merged")
    for n in base.names:
        b = base.tensor(n).double()
        taus = [e.tensor(n).double() - b for e in experts]
        sq = torch.stack([t.square().sum() for t in taus])
        want = b + sum(float(w) * t for w, t in zip(sq / sq.sum(), taus, strict=True))
        assert torch.allclose(merged.tensor(n).double(), want, atol=1e-6, rtol=0), n
