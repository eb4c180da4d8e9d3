"""`ray job submit`, for real: a Ray head started with `ray start --head` (its dashboard and job server) and
a worker node started with `ray start --address`, both from this venv, as an operator starts them; the
entrypoints are the ones the manifests in clusters/ name (tests/cluster_entrypoints.py), with the shared
volume /mnt/mergescale mapped to a temporary directory.

- a study submitted with `--working-dir`, its logs followed, stopped mid-run with `ray job stop`,
  resubmitted: it completes with no duplicate or lost rows, and the job is SUCCEEDED only then;
- a study that fails ends its job FAILED with the reason in the job's logs;
- the nightly leaderboard, two ticks of its one command line: 3 models submitted and run, 2 more submitted
  and run — only the 2 new ones are evaluated the second time, the site shows 5 with the right "new"
  marks, the history has one row per (model, evaluation).

The cluster is stopped by its process groups (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cluster_entrypoints as entry
import psutil
import pytest
import yaml

from mergescale.orchestrator import results as store

BIN = Path(sys.executable).parent
RAY, MERGESCALE = BIN / "ray", BIN / "mergescale"
ROOT = Path(__file__).parents[1]

pytestmark = [pytest.mark.zoo, pytest.mark.ray, pytest.mark.engine]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A head (1 CPU, dashboard and job server on 127.0.0.1) and one worker node (1 CPU), started by the
    `ray` CLI in their own process groups."""

    def __init__(self, tmp: Path):
        self.tmp, self.groups = tmp, []
        self.env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "disabled",
                    "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
        self.gcs, self.dashboard = _port(), _port()
        self.url = f"http://127.0.0.1:{self.dashboard}"

    def _start(self, args: list[str]) -> None:
        ports = ["--dashboard-agent-listen-port", str(_port()), "--metrics-export-port", str(_port()),
                 "--runtime-env-agent-port", str(_port())]  # fmt: skip
        proc = subprocess.Popen([str(RAY), "start", *args, *ports, "--node-ip-address", "127.0.0.1", "--num-cpus",
                                 "1", "--disable-usage-stats"], env=self.env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        self.groups.append(proc.pid)  # the daemons stay in the group of the `ray start` that launched them
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]

    def start(self) -> LocalCluster:
        self._start(["--head", "--port", str(self.gcs), "--include-dashboard", "true", "--dashboard-host",
                     "127.0.0.1", "--dashboard-port", str(self.dashboard), "--temp-dir", str(self.tmp),
                     "--ray-client-server-port", str(_port())])  # fmt: skip
        self._start(["--address", f"127.0.0.1:{self.gcs}"])
        deadline = time.monotonic() + 60
        while self.nodes() < 2:
            assert time.monotonic() < deadline, "the worker node did not join in 60 s"
            time.sleep(0.5)
        return self

    def nodes(self) -> int:
        out = subprocess.run([str(RAY), "status", "--address", f"127.0.0.1:{self.gcs}"], env=self.env,
                             capture_output=True, text=True).stdout  # fmt: skip
        active = out.split("Active:", 1)[-1].split("Pending:", 1)[0]
        return len(re.findall(r"node_[0-9a-f]+", active))

    def job(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run([str(RAY), "job", *args, "--address", self.url], env=self.env, capture_output=True,
                             text=True, timeout=900)  # fmt: skip
        assert not check or res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res

    def status(self, job_id: str) -> str:
        """What `ray job status` says (its words for the terminal states, the status itself otherwise)."""
        res = self.job("status", job_id)
        out = res.stdout + res.stderr
        for state, words in (("SUCCEEDED", "succeeded"), ("STOPPED", "was stopped"), ("FAILED", "failed")):
            if f"Job '{job_id}' {words}" in out:
                return state
        return re.search(r"Status for job '[^']+': (\w+)", out).group(1)

    def submit(self, job_id: str, command: str, working_dir: Path | None = None) -> list[str]:
        """`ray job submit ... -- COMMAND` (following the logs, as an operator does): the argv."""
        wd = ["--working-dir", str(working_dir)] if working_dir else []
        # as the manifests give it: a command line with `&&` as one word to `sh -c` (Ray quotes each word)
        words = ["sh", "-c", command] if "&&" in shlex.split(command) else shlex.split(command)
        return [str(RAY), "job", "submit", "--address", self.url, "--submission-id", job_id, *wd, "--", *words]

    def stop(self) -> None:
        from test_study import _kill_tree

        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) in self.groups:
                    _kill_tree(p.pid)  # and its children: workers run in sessions of their own
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass


@pytest.fixture(scope="module")
def cluster(tiny_zoo, tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("ray")).start()
    try:
        yield c
    finally:
        c.stop()


def _mount(tmp_path: Path) -> Path:
    """The shared volume of the manifests (/mnt/mergescale), here a temporary directory."""
    root = tmp_path / "mnt"
    (root / "specs").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "cluster" / "study.yaml", root / "specs" / "study.yaml")
    return root


class Follow:
    """A `ray job submit` that follows its job's logs, read in a thread."""

    def __init__(self, argv: list[str], env: dict):
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.thread.start()

    def text(self) -> str:
        return "".join(self.lines)


def _row_keys(rows: list[dict]) -> list[tuple]:
    return [(r["job_key"], r["model"], r["task"], r["kind"], r["metric"], r["reference"]) for r in rows]


def test_a_study_job_stopped_mid_run_resumes_when_resubmitted_and_succeeds_only_when_complete(cluster, tmp_path):
    mnt = _mount(tmp_path)
    command = entry.mapped(entry.STUDY, mnt)
    assert command != entry.STUDY and str(mnt) in command
    res = mnt / "results" / "study"

    first = Follow(cluster.submit("study-1", command, working_dir=mnt / "specs"), cluster.env)
    try:
        deadline = time.monotonic() + 420
        while not store.done_keys(res, store.JOBS):
            assert first.proc.poll() is None, first.text()[-3000:]
            assert time.monotonic() < deadline, "no job of the study finished in 7 min:\n" + first.text()[-3000:]
            time.sleep(0.1)
        cluster.job("stop", "study-1")
        first.proc.wait(timeout=120)
    finally:
        first.proc.kill()
    assert "Running entrypoint for job study-1" in first.text()  # its logs were followed
    deadline = time.monotonic() + 60
    while cluster.status("study-1") not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert cluster.status("study-1") == "STOPPED"
    done = {p.name: p.stat().st_mtime_ns for p in (res / store.JOBS).glob("*.parquet")}
    assert 1 <= len(done) < 12, "the stop should land mid-study"

    second = subprocess.run(cluster.submit("study-2", command, working_dir=mnt / "specs"), env=cluster.env,
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"12 jobs, {len(done)} already done, {12 - len(done)} run now" in second.stdout
    assert cluster.status("study-2") == "SUCCEEDED"
    after = {p.name: p.stat().st_mtime_ns for p in (res / store.JOBS).glob("*.parquet")}
    assert len(after) == 12 and all(after[n] == t for n, t in done.items())  # nothing lost, nothing redone
    rows = store.read_results(res).to_pylist()
    assert len(_row_keys(rows)) == len(set(_row_keys(rows)))  # no duplicate rows
    assert len({r["job_key"] for r in rows if r["job_kind"] == store.MERGE}) == 12
    assert not list(res.rglob(".*.tmp-*"))
    assert cluster.nodes() == 2  # the jobs ran on the cluster and left it running


def test_a_study_that_fails_ends_its_job_failed_with_the_reason_in_its_logs(cluster, tmp_path):
    mnt = _mount(tmp_path)
    spec = yaml.safe_load((mnt / "specs" / "study.yaml").read_text())
    spec["experts"]["gone"] = {"model": "models/missing/gone", "task": "zoo_copy"}  # no such directory
    (mnt / "specs" / "study.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    res = subprocess.run(cluster.submit("broken", entry.mapped(entry.STUDY, mnt), working_dir=mnt / "specs"),
                         env=cluster.env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode != 0  # `ray job submit` itself says the job failed
    assert cluster.status("broken") == "FAILED"
    logs = cluster.job("logs", "broken").stdout
    assert "mergescale: error: experts.gone:" in logs and "no such model directory" in logs
    assert not (mnt / "results" / "study" / store.JOBS).exists()  # nothing half-written


def _merge(zoo, out: Path, method: str, experts: list[str]) -> Path:
    spec = {"method": method, "base": str(zoo.base), "experts": [{"model": str(zoo.experts[e])} for e in experts]}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(spec))
    res = subprocess.run([str(MERGESCALE), "merge", str(path), "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def _mergekit(zoo, out: Path) -> Path:
    """A merge by mergekit itself (its card and mergekit_config.yml)."""
    from test_merge import mergekit_merge

    models = [{"model": str(zoo.experts[e]), "parameters": {"weight": 0.5}} for e in ("digit", "upper")]
    mergekit_merge({"merge_method": "task_arithmetic", "base_model": str(zoo.base), "dtype": "float32",
                    "models": models}, out)  # fmt: skip
    return out


def _submit(board: Path, *models: Path, name: str | None = None) -> str:
    res = subprocess.run([str(MERGESCALE), "leaderboard", "submit", str(board), *map(str, models),
                          *(["--name", name] if name else [])], capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_two_nightly_ticks_of_the_leaderboard_evaluate_only_what_is_new(cluster, tiny_zoo, tmp_path):
    mnt = _mount(tmp_path)
    board = mnt / "leaderboard"
    board.mkdir()
    shutil.copy(ROOT / "examples" / "leaderboard" / "leaderboard.yaml", board / "leaderboard.yaml")
    models = tmp_path / "models"
    models.mkdir()
    command = entry.mapped(entry.LEADERBOARD, mnt)

    _submit(board, tiny_zoo.experts["upper"], tiny_zoo.experts["rot13"])
    _submit(board, _merge(tiny_zoo, models / "ties-upper-rot13", "ties", ["upper", "rot13"]))
    tick1 = subprocess.run(cluster.submit("tick-1", command), env=cluster.env, capture_output=True, text=True,
                           timeout=900)  # fmt: skip
    assert tick1.returncode == 0 and cluster.status("tick-1") == "SUCCEEDED", tick1.stdout[-3000:]
    assert "run-0001: 3 evaluated, 0 failed" in tick1.stdout

    _submit(board, _mergekit(tiny_zoo, models / "mergekit-ta"))
    _submit(board, tiny_zoo.experts["digit"], name="digit <b>bold</b>")
    tick2 = subprocess.run(cluster.submit("tick-2", command), env=cluster.env, capture_output=True, text=True,
                           timeout=900)  # fmt: skip
    assert tick2.returncode == 0 and cluster.status("tick-2") == "SUCCEEDED", tick2.stdout[-3000:]
    assert "run-0002: 2 evaluated, 0 failed" in tick2.stdout  # only the two new ones

    requests = [json.loads(p.read_text()) for p in (board / "queue").glob("*.json")]
    assert len(requests) == 5 and {r["state"] for r in requests} == {"FINISHED"}
    assert all(r["attempts"] == 1 for r in requests)  # each evaluated once
    assert {r["run"] for r in requests} == {"run-0001", "run-0002"}
    by_name = {r["name"]: r for r in requests}
    assert by_name["mergekit-ta"]["merge"] and by_name["mergekit-ta"]["provenance"]["card"] == "mergekit"
    assert by_name["mergekit-ta"]["provenance"]["method"] == "task_arithmetic"
    assert by_name["ties-upper-rot13"]["provenance"]["card"] == "mergescale"
    assert not by_name["upper"]["merge"]

    site = mnt / "site"
    rows = json.loads((site / "data.json").read_text())
    rows = rows["models"] if isinstance(rows, dict) else rows
    assert len(rows) == 5
    new = {r["name"] for r in rows if r["new"]}
    assert new == {"mergekit-ta", "digit <b>bold</b>"}
    with open(site / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    assert len(history) == 5  # one row per (model, evaluation)
    units = store.done_keys(board / "results", store.JOBS)
    assert units == {r["id"] for r in requests}

    from browser import launch

    with launch() as browser:
        page = browser.new_page()
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((site / "index.html").as_uri())
        page.wait_for_selector("tbody tr[data-id]")
        assert page.locator("tbody tr[data-id]").count() == 5
        marked = page.locator("tbody tr.new").evaluate_all("rows => rows.map(r => r.dataset.id)")
        assert sorted(marked) == sorted(r["id"] for r in rows if r["new"])
        assert not errors, errors
