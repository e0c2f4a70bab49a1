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
