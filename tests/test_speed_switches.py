"""The speed switches change how the step runs, not what it computes: channels_last (NHWC UNet and first
stage) and regional compilation give the eager NCHW run's losses in fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import train_helpers as th

COMMON = ["model=tiny_kl", "train.max_steps=3", "checkpoint.interval_steps=100", "logging.image_interval_steps=0"]


@pytest.fixture(scope="module")
def eager_losses(tmp_path_factory) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("eager") / "run"
    th.run(run_dir, COMMON)
    return th.losses(run_dir)


@pytest.mark.slow
def test_channels_last_gives_the_same_losses(tmp_path: Path, eager_losses) -> None:
    run_dir = tmp_path / "run"
    th.run(run_dir, [*COMMON, "train.channels_last=true"])
    losses = th.losses(run_dir)
    assert sorted(losses) == sorted(eager_losses) == [1, 2, 3]
    np.testing.assert_allclose([losses[s] for s in (1, 2, 3)], [eager_losses[s] for s in (1, 2, 3)], rtol=1e-5)
