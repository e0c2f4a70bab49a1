import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")

# Keep every cache out of ~ even when pytest is run directly rather than through make.
for var, sub in (("TORCH_HOME", "torch"), ("TORCH_EXTENSIONS_DIR", "torch_extensions"),
                 ("HF_HOME", "huggingface"), ("WANDB_DIR", "wandb"), ("WANDB_CACHE_DIR", "wandb/cache"),
                 ("WANDB_CONFIG_DIR", "wandb/config"), ("WANDB_DATA_DIR", "wandb/data"),
                 ("MPLCONFIGDIR", "matplotlib")):
    os.environ.setdefault(var, str(ROOT / ".cache" / sub))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def compose():
    """Compose a config from conf/ exactly as the Hydra apps do, returning the DictConfig."""
    from hydra import compose as hydra_compose, initialize_config_dir

    def _compose(config_name: str, overrides: list[str] | None = None):
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return hydra_compose(config_name=config_name, overrides=overrides or [])

    return _compose


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 for the whole session, with test AWS credentials in the env."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[test]')")
    from s3_server import TEST_ACCESS_KEY, TEST_REGION, TEST_SECRET_KEY, MotoServer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY)
        mp.setenv("AWS_DEFAULT_REGION", TEST_REGION)
        with MotoServer() as server:
            yield server


@pytest.fixture
def fault_proxy(s3_server):
    """A FaultProxy in front of the session's moto server; point s3fs at ``fault_proxy.endpoint_url``."""
    from s3_server import FaultProxy

    with FaultProxy(s3_server.host, s3_server.port) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real one-node SLURM cluster (munged, slurmctld, slurmd on 127.0.0.1) for the whole session.

    Pass ``slurm_cluster.env`` to subprocesses that run sbatch/squeue/scontrol. Skipped only when
    SLURM is not installed (``.ci/run`` installs Debian's slurm-wlm and munge).
    """
    from slurm_cluster import SlurmCluster, find_binary

    if find_binary("slurmctld") is None:
        pytest.skip("slurmctld is not installed (apt-get install -y slurm-wlm munge)")
    with SlurmCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def slurm_two_nodes():
    """A real two-node SLURM cluster (tests/slurm_cluster.py, MultiNodeSlurmCluster): one slurmd per
    network namespace, ``node1`` and ``node2``, each with its own address on interface ``tnet0``.

    Skipped with the reason when this machine cannot run it (no root, no network namespaces, no SLURM).
    """
    from slurm_cluster import MultiNodeSlurmCluster, multi_node_unavailable

    reason = multi_node_unavailable()
    if reason:
        pytest.skip(f"two-node SLURM cluster unavailable: {reason}")
    # 4 CPUs per node (declared; slurm.conf's values win): two 2-node jobs of 2 tasks run at once.
    with MultiNodeSlurmCluster(num_nodes=2, num_cpus=4) as cluster:
        yield cluster
