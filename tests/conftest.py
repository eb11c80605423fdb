import os

# Tests run Ray clusters on loopback only; token auth is on everywhere else (Ray's default).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see cluster/pipeline.py: spinning OpenMP pools starve each other


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    """One private local Ray cluster per test module (Ray takes seconds to start here); yields its
    GCS address. address="local" never joins a cluster someone else started."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The demo LM and demo classifier, written fresh for the module."""
    from stages.demo import make_demo_model

    root = tmp_path_factory.mktemp("models")
    return make_demo_model(root / "lm"), make_demo_model(root / "cls", task="classification")
