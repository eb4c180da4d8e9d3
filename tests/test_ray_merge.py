"""The sharded merge on a real local Ray (and a fake two-node cluster): same bytes as one process,
whatever the workers or blocks; a killed worker is retried; memory stays bounded per block."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from mergescale.errors import MergescaleError
from mergescale.merge_ops.granularity import locate
from mergescale.methods import get_method
from mergescale.orchestrator import ray_merge
from mergescale.orchestrator.merge import run_merge
from mergescale.orchestrator.plan import params_for, plan_merge
from mergescale.orchestrator.shard import TASK_THREADS, merge_shard, shard_stats
from mergescale.specs import MergeSpec
from mergescale.zoo.synthetic import write_family

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]

SMALL = {
    "vocab_size": 16384, "hidden_size": 512, "num_hidden_layers": 4, "intermediate_size": 1536,
    "num_attention_heads": 8, "num_key_value_heads": 2,
}  # fmt: skip


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """fp32 base + 2 experts, ~29 M parameters each; the embedding (8.4 M elements) spans many blocks."""
    return write_family(tmp_path_factory.mktemp("family"), SMALL, n_experts=2, dtype=torch.float32)


def spec_of(method: str, base: Path | None, experts: list[Path], **parameters) -> MergeSpec:
    return MergeSpec.model_validate(
        {"method": method, "base": str(base) if base else None, "experts": [str(e) for e in experts],
         "parameters": parameters, "seed": 7}
    )  # fmt: skip


def files(model: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model.glob("*.safetensors"))}


def single_process(spec: MergeSpec, out: Path) -> dict[str, bytes]:
    """The reference: every statistics pass and shard merged one after the other in this process,
    each tensor whole (the default block size exceeds every zoo tensor), with the tasks' threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(TASK_THREADS)
    try:
        return _single_process(spec, out)
    finally:
        torch.set_num_threads(threads)


def _single_process(spec: MergeSpec, out: Path) -> dict[str, bytes]:
    plan = plan_merge(spec)
    method = get_method(spec.method)
    state = None
    for step in range(method.stats_passes(params_for(spec, locate(plan.shards[0].names[0], plan.num_layers)))):
        per_tensor = {}
        for i in range(len(plan.shards)):
            per_tensor.update(shard_stats(plan, i, step, state))
        state = method.reduce(step, per_tensor, state)
    out.mkdir()
    for i in range(len(plan.shards)):
        merge_shard(plan, i, out, state)
    return files(out)


CASES = {
    "task_arithmetic": {"lambda": 0.5},
    "ties": {"density": 0.3, "scope": "tensor"},  # streamed in blocks; the default scope is global
    "ties_global": {"density": 0.3, "scope": "global"},
    "dare_ties": {"density": 0.5},
    "della": {"density": 0.5, "epsilon": 0.1},
    "breadcrumbs": {},
    "model_stock": {},
    "metagpt": {},
    "tsv": {},
    "awd": {"steps": 5},
}


@pytest.mark.zoo
@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_ray_merge_equals_the_single_process_merge(case, tiny_zoo, tmp_path):
    method = case.removesuffix("_global")
    spec = spec_of(method, tiny_zoo.base, [tiny_zoo.experts[t] for t in ("upper", "digit", "atbash")], **CASES[case])
    want = single_process(spec, tmp_path / "single")
    # on Ray with 2 workers and tiny blocks: row-wise methods stream every tensor in many blocks
    got = run_merge(spec, tmp_path / "ray", progress=False, workers=2, block_elements=4096)
    assert got.shards == len(want)
    assert files(tmp_path / "ray") == want


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della_linear", "task_arithmetic"])
def test_bytes_do_not_depend_on_workers_or_blocks(method, family, tmp_path):
    base, experts = family
    params = {} if method == "task_arithmetic" else {"density": 0.4} | ({"scope": "tensor"} if method == "ties" else {})
    spec = spec_of(method, base, experts, **params)
    one = run_merge(spec, tmp_path / "one", progress=False, workers=1, block_elements=1 << 30)
    two = run_merge(spec, tmp_path / "two", progress=False, workers=2, block_elements=1 << 16)
    assert (one.workers, two.workers) == (1, 2)
    assert files(tmp_path / "one") == files(tmp_path / "two")
    card = (tmp_path / "two" / "README.md").read_text()
    for shard in ray_merge_shards(tmp_path / "two"):
        assert shard in card  # the model card lists every shard's sha256


@pytest.mark.parametrize("case", ["task_arithmetic", "ties", "ties_global", "dare_ties", "metagpt", "awd"])
def test_the_in_process_runner_writes_the_bytes_of_the_ray_runner(case, family, tmp_path):
    """A one-off merge without a cluster runs the same shard function in threads of this process."""
    base, experts = family
    params = {"task_arithmetic": {}, "awd": {"steps": 5}, "metagpt": {}}.get(case, {"density": 0.4})
    if case.startswith("ties"):
        params["scope"] = "global" if case.endswith("_global") else "tensor"
    spec = spec_of(case.removesuffix("_global"), base, experts, **params)
    local = run_merge(spec, tmp_path / "local", progress=False, local=True, workers=2, block_elements=1 << 16)
    on_ray = run_merge(spec, tmp_path / "ray", progress=False, local=False, workers=2)
    assert (local.runner, on_ray.runner) == ("local", "ray")
    assert files(tmp_path / "local") == files(tmp_path / "ray")


def ray_merge_shards(model: Path) -> list[str]:
    import hashlib

    return [hashlib.sha256(b).hexdigest() for b in files(model).values()]


def merge_task_processes() -> list[psutil.Process]:
    """Ray workers of this test session currently running a shard merge (their title says so)."""
    found = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith("ray::_merge_task"):
                found.append(p)
        except psutil.Error:
            pass
    return found


def run_in_thread(fn):
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            box["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def test_killed_worker_is_retried_and_the_output_is_identical(family, tmp_path):
    base, experts = family
    spec = spec_of("ties", base, experts, density=0.2, scope="tensor")
    run_merge(spec, tmp_path / "undisturbed", progress=False, workers=1)
    thread, box = run_in_thread(lambda: run_merge(spec, tmp_path / "killed", progress=False, workers=1))
    killed = None
    deadline = time.time() + 120
    while killed is None and thread.is_alive() and time.time() < deadline:
        for p in merge_task_processes():
            p.send_signal(signal.SIGKILL)  # a real kill of the worker process, mid-shard
            killed = p.pid
            break
        time.sleep(0.005)
    thread.join(timeout=300)
    assert killed is not None, "no shard task was caught running"
    assert "error" not in box, box.get("error")
    assert files(tmp_path / "killed") == files(tmp_path / "undisturbed")
    assert not list((tmp_path / "killed").glob(".*")), "no partial shard file may be published"


def test_a_shard_that_keeps_failing_fails_the_merge_and_publishes_nothing(family, tmp_path):
    base, experts = family
    spec = spec_of("task_arithmetic", base, experts)
    thread, box = run_in_thread(lambda: run_merge(spec, tmp_path / "out", progress=False, workers=1))
    killed: set[int] = set()  # distinct worker processes: a dying one may be signalled twice under load
    while thread.is_alive() and len(killed) < 20:
        for p in merge_task_processes():
            try:
                p.send_signal(signal.SIGKILL)
                killed.add(p.pid)
            except psutil.Error:
                pass
        time.sleep(0.005)
    thread.join(timeout=300)
    err = box.get("error")
    assert isinstance(err, MergescaleError), box
    plan = plan_merge(spec)
    first = plan.shards[plan.schedule()[0]].label  # one worker: the shard started first (the largest) is hit
    assert f"shard {first}:" in str(err) and f"died {ray_merge.MAX_RETRIES + 1} times" in str(err)
    assert len(killed) == ray_merge.MAX_RETRIES + 1
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.staging*")), "the staging directory must be removed"


def test_nan_in_a_shard_task_names_the_file_and_tensor(family, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    base, experts = family
    bad = tmp_path / "bad"
    shutil.copytree(experts[0], bad)
    name = "model.layers.2.mlp.up_proj.weight"
    shard = next(p for p in sorted(bad.glob("*.safetensors")) if name in load_file(p))
    tensors = load_file(shard)
    tensors[name][3, 5] = float("inf")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(MergescaleError, match=f"{shard}: tensor {name} holds NaN or Inf"):
        run_merge(spec_of("ties", base, [bad, experts[1]]), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_memory_of_a_shard_task_is_bounded_by_blocks_not_tensors(family, tmp_path):
    base, experts = family
    spec = spec_of("task_arithmetic", base, experts)
    # the embedding alone is 8.4 M fp32 elements: 34 MB per input, 100 MB for the three inputs
    whole = run_merge(spec, tmp_path / "whole", progress=False, workers=1, block_elements=1 << 30)
    blocks = run_merge(spec, tmp_path / "blocks", progress=False, workers=1, block_elements=1 << 18)
    assert files(tmp_path / "whole") == files(tmp_path / "blocks")
    assert whole.max_task_rss_growth > 150e6, whole  # the whole-tensor merge holds all inputs at once
    # streamed: the shard's output (34 MB) plus a few 1 MB blocks
    assert blocks.max_task_rss_growth < 90e6, blocks


@pytest.mark.parametrize("how", ["--address", "RAY_ADDRESS"])
def test_two_node_cluster_through_the_cli(how, family, tmp_path):
    """`--address`, or `RAY_ADDRESS` as `ray job submit` sets it for its entrypoint."""
    from ray.cluster_utils import Cluster

    base, experts = family
    spec_path = tmp_path / "merge.yaml"
    spec_path.write_text(yaml.safe_dump({"method": "ties", "base": str(base), "experts": [str(e) for e in experts]}))
    run_merge(spec_of("ties", base, experts), tmp_path / "local", progress=False)
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        cmd = [sys.executable, "-m", "mergescale.cli", "merge", str(spec_path), "--out", str(tmp_path / "cluster")]
        by_flag = how == "--address"
        res = subprocess.run(
            cmd + (["--address", cluster.address] if by_flag else []),
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "RAY_ADDRESS": "" if by_flag else cluster.address},
        )  # fmt: skip
    finally:
        cluster.shutdown()
    assert res.returncode == 0, res.stderr
    assert "on 2 Ray worker(s), 2 node(s)" in res.stderr, res.stderr
    assert files(tmp_path / "cluster") == files(tmp_path / "local")


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear"])
def test_bf16_experts_read_as_stored_give_the_bytes_of_upcasting_first(method, tmp_path, monkeypatch):
    """Methods with ``experts_as_stored`` skip the experts' fp32 upcast; no output bit may change."""
    small = {**SMALL, "vocab_size": 2048, "num_hidden_layers": 2}
    base, experts = write_family(tmp_path / "bf16", small, n_experts=2, dtype=torch.bfloat16)
    params = {} if method == "task_arithmetic" else {"density": 0.3} | ({"scope": "tensor"} if method == "ties" else {})
    spec = spec_of(method, base, experts, **params)
    assert get_method(method).experts_as_stored
    run_merge(spec, tmp_path / "ray", progress=False, workers=2, block_elements=1 << 16)
    monkeypatch.setattr(type(get_method(method)), "experts_as_stored", False)
    assert files(tmp_path / "ray") == single_process(spec, tmp_path / "upcast")


@pytest.mark.zoo
def test_device_and_workers_are_checked_against_the_cluster(tiny_zoo, tmp_path):
    spec = spec_of("task_arithmetic", tiny_zoo.base, [tiny_zoo.experts["upper"]])
    with pytest.raises(MergescaleError, match="--device cuda: the Ray cluster has no GPUs"):
        run_merge(spec, tmp_path / "cuda", progress=False, device="cuda")
    with pytest.raises(MergescaleError, match="--workers 0: need at least 1"):
        run_merge(spec, tmp_path / "zero", progress=False, workers=0)
    with pytest.raises(MergescaleError, match="--device gpu: choose auto, cpu or cuda"):
        run_merge(spec, tmp_path / "gpu", progress=False, device="gpu")
    assert not list(tmp_path.iterdir()), "nothing may be left behind"
