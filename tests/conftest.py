"""Test set-up: the Triton interpreter must be switched on before anything imports triton."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` (the README's command): two workers share the cores, so each runs its in-process models on
    # one intra-op thread (the CLI tests' subprocesses already get OMP_NUM_THREADS=1: tests/cli_runner.py)
    torch.set_num_threads(1)


ONE_WORKER = {f"tests/{m}.py": "clusters" for m in ("test_grid", "test_slurm", "test_reliability_inputs")}
"""Test modules that run on one worker under `pytest -n 2`: those that start a local Ray or SLURM cluster."""


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`pytest -n 2` (the README's command) sends each test module whole to one worker, so its module-scoped
    fixtures (whole training runs) are built once, and the modules of ONE_WORKER together (one local Ray or
    SLURM cluster at a time). xdist's loadgroup would do this with marks, but pytest 9.2 ignores the test ids
    it rewrites."""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return ONE_WORKER.get(path, path)
    return ByModule(config, log)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored after): tiny models on a shared 2-core machine run ~10x
    slower with two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A single-node SLURM cluster for the whole session (tests/slurm_cluster.py: munged, slurmctld, slurmd
    with every file under a temp dir), SLURM_CONF pointing at it; its daemons stopped by PID at the end.
    Skipped where SLURM is not installed, unless FASTGROK_REQUIRE_SLURM=1 (.ci/run), where that fails."""
    from slurm_cluster import Cluster, available
    why = available()
    if why is None:
        try:
            import submitit  # noqa: F401
        except ImportError:
            why = "submitit is not installed (pip install -e '.[dev]')"
    if why is not None:
        (pytest.fail if os.environ.get("FASTGROK_REQUIRE_SLURM") == "1" else pytest.skip)(why)
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.start()["SLURM_CONF"])
    try:
        yield cluster
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
