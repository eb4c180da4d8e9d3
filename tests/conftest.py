import os

import pytest

# Throwaway local Ray clusters in tests run without token authentication (ENVIRONMENT.md).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_zoo():
    """The real tiny zoo, built once (≈ 3–4 min on 2 cores) and cached under $MERGESCALE_CACHE."""
    from mergescale.zoo.build import build_zoo, preset_spec

    return build_zoo(preset_spec("tiny"), progress=False)


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole session (2 CPUs, like CI); merges and evaluators join it."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    yield ray
