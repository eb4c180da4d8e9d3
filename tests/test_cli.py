"""The CLI as a user runs it: the installed console script, in a subprocess."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# the console script installed beside this interpreter (the venv may not be on PATH)
MERGESCALE = shutil.which("mergescale", path=str(Path(sys.executable).parent)) or shutil.which("mergescale")


def run(*args: str) -> subprocess.CompletedProcess:
    assert MERGESCALE, "the mergescale console script is not installed"
    return subprocess.run([MERGESCALE, *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_subcommand():
    res = run("--help")
    assert res.returncode == 0
    for sub in ("zoo", "merge", "eval", "study"):
        assert sub in res.stdout


def test_a_bad_study_spec_is_one_line_naming_the_line_and_key(tmp_path):
    spec = tmp_path / "study.yaml"
    spec.write_text("name: s\nbase: zoo:base\nexperts: zoo\nsubsets:\n  sizes: [2]\n  smaple: 3\nmethods: []\n")
    res = run("study", "run", str(spec))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"mergescale: error: {spec}:6: key `subsets.smaple`: Extra inputs are not permitted; "
        "did you mean `sample`? known keys: sizes, sample, seed"
    ]
    assert not (tmp_path / "results").exists()


def test_eval_of_a_missing_model_dir_is_one_line(tmp_path):
    res = run("eval", str(tmp_path / "nowhere"), "--tasks", "zoo_upper")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"mergescale: error: {tmp_path / 'nowhere'}: not a Hugging Face model directory (no config.json)"
    ]


def test_user_error_is_one_line_and_verbose_shows_the_traceback(tmp_path):
    res = run("zoo", "show", str(tmp_path / "nowhere"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"mergescale: error: {tmp_path / 'nowhere'}: no zoo.json; build a zoo with "
        f"`mergescale zoo build --out {tmp_path / 'nowhere'}`"
    ]
    res = run("--verbose", "zoo", "show", str(tmp_path / "nowhere"))
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "ModelError" in res.stderr


def test_bad_arguments_fail_with_usage():
    res = run("zoo", "build", "--preset", "huge")
    assert res.returncode == 2
    want = "mergescale: error: unknown zoo preset 'huge'; use one of: tiny, small, xs, s, m, l, edit"
    assert res.stderr.strip() == want
    res = run("zoo", "build", "--preset", "tiny", "--base", "instruct")
    assert res.returncode == 2 and "has a pretrained base only" in res.stderr
    res = run("zoo", "build", "--seed", "one")
    assert res.returncode == 2 and "--seed: 'one' is not an integer" in res.stderr
    res = run("zoo", "build", "--bogus")
    assert res.returncode == 2 and "unrecognized arguments: --bogus" in res.stderr


@pytest.mark.zoo
def test_zoo_build_reuses_the_cache_and_prints_the_score_table(tiny_zoo):
    res = run("zoo", "build", "--quiet")  # the zoo fixture has filled the cache: the command reuses it
    assert res.returncode == 0, res.stderr
    assert str(tiny_zoo.root) in res.stdout
    for model in ["base"] + list(tiny_zoo.experts):
        assert model in res.stdout
