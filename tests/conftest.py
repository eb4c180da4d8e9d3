import os
import sys

import pytest

# Throwaway local Ray clusters in tests run without token authentication (ENVIRONMENT.md).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# ---------------------------------------------------------------- test tiers
# `make test` runs every test; `make test-fast` runs `-m "not zoo and not ray and not engine"`: the tests
# that need no zoo, no Ray and no inference engine (markers declared in pyproject.toml). The fast tier is
# only fast if the markers are right, so two checks keep them honest:
#   1. at collection: a test that uses a fixture of FIXTURE_MARKERS (itself or through another fixture)
#      without that fixture's marker is a usage error, whatever is selected;
#   2. at the end of a run in which no selected test carries `ray` (or `engine`): Ray must not have been
#      initialized in this process, nor vLLM imported. That catches a test that starts them without the
#      fixtures (an in-process `run_merge`, `Evaluator`); the report names the first test after which
#      it was seen. Ray or vLLM started in a subprocess is not seen: mark CLI tests by what they start.

#: fixture -> the marker a test using it must carry (the engine fixtures are test_eval's and test_fit's)
FIXTURE_MARKERS = {"tiny_zoo": "zoo", "edit_zoo": "zoo", "ray_session": "ray", "hf": "engine", "pool": "engine",
                   "hf_evaluator": "engine"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: every collected test is checked
def pytest_collection_modifyitems(config, items):
    missing = [
        f"{item.nodeid} uses the fixture `{fixture}` but is not marked `{marker}`"
        for item in items
        for fixture, marker in FIXTURE_MARKERS.items()
        if fixture in getattr(item, "fixturenames", ()) and item.get_closest_marker(marker) is None
    ]
    if missing:
        raise pytest.UsageError(
            "tests that start the zoo, Ray or an engine must say so (add the marker):\n  " + "\n  ".join(missing)
        )


def _ray_initialized() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


#: marker -> (what it starts, whether this process has started it)
_STARTED = {"ray": ("Ray", _ray_initialized), "engine": ("vLLM", lambda: "vllm" in sys.modules)}
_first_seen: dict[str, str] = {}  # marker -> the test after which its component was first seen


def pytest_runtest_logfinish(nodeid):
    for marker, (_, started) in _STARTED.items():
        if marker not in _first_seen and started():
            _first_seen[marker] = nodeid


def pytest_sessionfinish(session):
    for marker, (what, started) in _STARTED.items():
        selected = any(item.get_closest_marker(marker) for item in session.items)
        if not selected and started():
            where = _first_seen.get(marker, "collection (a test module's imports)")
            session.config.get_terminal_writer().line(
                f"\ntest tiers: {what} was started in a run that selected no test marked `{marker}` "
                f"(first seen after {where}); mark the test that starts it `{marker}`",
                red=True,
            )
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def tiny_zoo():
    """The real tiny zoo, built once (≈ 3–4 min on 2 cores) and cached under $MERGESCALE_CACHE."""
    from mergescale.zoo.build import build_zoo, preset_spec

    return build_zoo(preset_spec("tiny"), progress=False)


@pytest.fixture(scope="session")
def edit_zoo():
    """The real editing zoo (checkpoints, a next version, analogy and transfer experts), built once (≈ 5 min)."""
    from mergescale.zoo.build import build_zoo, preset_spec

    return build_zoo(preset_spec("edit"), progress=False)


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole session (2 CPUs, like CI); merges and evaluators join it.

    Its workers' and raylet's logs stay in its session directory (``log_to_driver=False``): forwarded, they
    reach this process's stderr at any moment, inside another test's captured output (a CI run failed on the
    raylet's "over 95% full" disk warning landing in a test that compares stderr line by line)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
