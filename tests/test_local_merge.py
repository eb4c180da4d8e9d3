"""A one-off `mergescale merge` without a cluster: in-process shards, a quiet console, honest exit codes.

Fast tier: a tiny synthetic family written by the test, no zoo, no Ray, no engine.
"""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from mergescale.zoo.synthetic import write_family

MERGESCALE = Path(sys.executable).parent / "mergescale"
TINY = {
    "vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 3, "intermediate_size": 256,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64,
}  # fmt: skip


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("family"), TINY, n_experts=3, dtype=torch.bfloat16,
                        shard_bytes=1 << 20)  # fmt: skip


def spec_file(tmp_path: Path, family, method: str = "ties", **parameters) -> Path:
    base, experts = family
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump({"method": method, "base": str(base), "experts": [str(e) for e in experts],
                                    "parameters": parameters, "seed": 3}))  # fmt: skip
    return path


def run(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(MERGESCALE), *args], capture_output=True, text=True, timeout=300, env=env)


def test_one_off_merge_runs_in_process_without_ray_and_says_little(family, tmp_path):
    out = tmp_path / "merged"
    res = run("merge", str(spec_file(tmp_path, family, density=0.3)), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(out)
    lines = res.stderr.strip().splitlines()
    assert lines[0] == f"log: {out}.log"
    assert "in this process" in lines[-1] and "Ray" not in lines[-1]
    assert len(lines) <= 4, lines  # log path, the progress bar (final state), the summary
    assert (out / "config.json").is_file() and len(list(out.glob("*.safetensors"))) == 5
    log = Path(f"{out}.log").read_text()
    assert "mergescale merge" in log and "published" in log
    assert not (out / "mergescale.log").exists(), "the model directory holds the model only"


def test_in_process_merge_never_imports_ray(family, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from mergescale.cli import main
        assert main(["merge", {str(spec_file(tmp_path, family, "dare_ties"))!r}, "--out",
                     {str(tmp_path / "out")!r}, "--quiet"]) == 0
        print(json.dumps(sorted(m for m in ("ray", "vllm", "lm_eval", "transformers") if m in sys.modules)))
    """).replace("import sys", "import json, sys")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


def test_a_user_error_is_one_line_and_exit_2(family, tmp_path):
    res = run("merge", str(spec_file(tmp_path, family, "ties", density=[0.2, 0.5], scope=[1, 2])), "--out",
              str(tmp_path / "out"))  # fmt: skip
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mergescale: error: parameters.scope:"), lines
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_a_bug_is_named_a_bug_exit_1_with_the_traceback_in_the_log(family, tmp_path):
    """A merge method that raises something other than a MergescaleError is a bug, not the user's input: one
    line says so and where the traceback is; nothing is published."""
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import sys
        from mergescale.merge_ops.registry import Method, register
        from mergescale.cli import main

        @register
        class Broken(Method):
            name = "broken_for_test"

            def merge(self, base, experts, params, ctx):
                return base / 0 if ctx.name.endswith("mlp.up_proj.weight") and {{}}["no such key"] else base

        sys.exit(main(["merge", {str(spec_file(tmp_path, family, "broken_for_test"))!r}, "--out", {str(out)!r}]))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    # the first shard to fail is named (two run at once, so which layer it is may vary)
    named = r"mergescale: bug: ShardFailure: shard layer (\d+), tensor model\.layers\.\1\.mlp\.up_proj\.weight"
    assert re.match(named, last), last
    assert "KeyError" in last and f"the traceback is in {out}.log" in last
    assert "Traceback" not in res.stderr
    log = Path(f"{out}.log").read_text()
    assert "Traceback (most recent call last)" in log and "KeyError: 'no such key'" in log
    assert not out.exists() and not list(tmp_path.glob(".out.staging*"))


def test_verbose_shows_the_traceback_and_library_output(family, tmp_path):
    res = run("--verbose", "merge", str(spec_file(tmp_path, family, "ties", scope=[1, 2])), "--out",
              str(tmp_path / "out"))  # fmt: skip
    assert res.returncode == 2
    assert "INFO mergescale.cli: mergescale" in res.stderr and "Traceback (most recent call last)" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("mergescale: error: parameters.scope")


def test_shards_start_largest_first_and_each_exactly_once(family, tmp_path):
    """The embeddings' and the head's shards (the biggest) start before the layers', so that none of them
    starts last while the other workers have run dry; equal sizes keep shard order."""
    from mergescale.orchestrator.plan import plan_merge
    from mergescale.specs import load_merge_spec

    plan = plan_merge(load_merge_spec(spec_file(tmp_path, family)))
    order = plan.schedule()
    sizes = [plan.shards[i].input_bytes for i in order]
    assert sorted(order) == list(range(len(plan.shards))) and len(set(sizes)) > 1
    assert sizes == sorted(sizes, reverse=True)
    assert all(a < b for a, b in zip(order, order[1:], strict=False) if sizes[order.index(a)] == sizes[order.index(b)])
