"""The trunk's parts without a launcher: configs, LR schedule, data order, EMA, checkpoint store,
and one-process runs of ``trainer.train`` (NaN guard, outputs)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import train_helpers as th
from data_pipeline.indexed import GlobalOrder, InMemoryBatches, Samples, load_shards
from trainer.runtime.checkpoint import CheckpointStore, needs_universal
from trainer.config import TrainConfig, config_differences
from trainer.runtime.ema import EMA
from trainer.runtime.engine import DeepSpeedConfig, WarmupDecay, deepspeed_config, parameter_groups


def _train_config(compose, overrides: list[str]) -> TrainConfig:
    return OmegaConf.to_object(compose("train", overrides))


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("experiment", ["demo", "tiny"])
def test_experiments_compose(compose, experiment: str) -> None:
    cfg = _train_config(compose, [f"experiment={experiment}"])
    assert cfg.experiment == experiment and cfg.run_dir == f"runs/{experiment}"
    assert cfg.model.name == "tiny"


def test_paper_experiment_composes(compose) -> None:
    cfg = _train_config(compose, ["experiment=ldm_1p45b_256", "data.urls=['s3://bucket/laion/{00000..00009}.tar']"])
    assert cfg.model.name == "ldm_1p45b" and cfg.data.image_size == 256
    assert cfg.model.unet.in_channels == 4 and cfg.model.autoencoder.kind == "kl"
    assert cfg.train.global_batch_size == 680 and cfg.optim.lr == 1e-4
    assert cfg.train.gradient_accumulation(8) == 1
    with pytest.raises(ValueError, match=r"train.global_batch_size=680 .* multiple of 1360"):
        cfg.train.gradient_accumulation(16)


@pytest.mark.parametrize("override, message", [
    ("deepspeed.zero_stage=4", r"deepspeed.zero_stage=4 is invalid; allowed: one of \(0, 1, 2, 3\)"),
    ("deepspeed.precision=fp8", r"deepspeed.precision='fp8' is invalid"),
    ("optim.schedule=step", r"optim.schedule='step' is invalid; allowed: one of"),
    ("optim.lr=0", r"optim.lr=0.0 is invalid; allowed: a float > 0"),
    ("eval.sampler=euler", r"eval.sampler='euler' is invalid"),
    ("train.micro_batch_size=3", r"train.global_batch_size=8 is not a multiple of train.micro_batch_size=3"),
    ("ema.decay=1.5", r"ema.decay=1.5 is invalid"),
    ("checkpoint.keep_last=0", r"checkpoint.keep_last=0 is invalid; allowed: an int >= 1"),
    ("data.kind=lmdb", r"data.kind='lmdb' is invalid"),
    ("logging.wandb_mode=cloud", r"logging.wandb_mode"),
])
def test_invalid_values_fail_before_anything_is_built(compose, override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _train_config(compose, ["experiment=tiny", override])


def test_cross_group_checks(compose) -> None:
    with pytest.raises(ValueError, match="eval.kind='digits' .* data.kind='digits'"):
        _train_config(compose, ["experiment=demo", "data=webdataset", "data.urls=[a.tar]"])
    with pytest.raises(ValueError, match="precision='fp16' with deepspeed.zero_stage=0"):
        _train_config(compose, ["experiment=tiny", "deepspeed=zero0", "deepspeed.precision=fp16"])


@pytest.mark.parametrize("overrides, message", [
    # The paper's KL-f8 + 4-level UNet: latent 264/8 = 33 px cannot be halved 3 times.
    (["experiment=ldm_1p45b_256", "data.urls=[a.tar]", "data.image_size=264"],
     r"data.image_size=264 is invalid; allowed: a multiple of 64 \(e.g. 256 or 320\): the first stage "
     r"\(model.autoencoder, factor 8\) makes a 33 px latent, which the UNet's 4 levels"),
    (["experiment=ldm_1p45b_256", "data.urls=[a.tar]", "eval.resolution=200"], r"eval.resolution=200 is invalid; allowed: a multiple of 64"),
    (["experiment=ldm_1p45b_256", "data.urls=[a.tar]", "data.buckets.enabled=true", "data.buckets.step=32"],
     r"data.buckets.step=32 is invalid; allowed: a multiple of 64"),
    # Pixel space (identity first stage) with the tiny 2-level UNet: the side must be even.
    (["experiment=tiny", "data.image_size=17"], r"data.image_size=17 is invalid; allowed: a multiple of 2"),
    (["experiment=demo_autoencoder", "data.image_size=17"], r"data.image_size=17 is invalid; allowed: a multiple of "
                                                             r"the autoencoder's downsampling factor 2"),
])
def test_image_sizes_the_networks_cannot_divide_fail_naming_the_key(compose, overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        _train_config(compose, overrides)


def test_precision_the_device_cannot_train_fails_before_the_engine() -> None:
    cfg = DeepSpeedConfig(zero_stage=2, precision="fp16")
    with pytest.raises(ValueError, match=r"deepspeed.precision='fp16' is invalid; allowed: fp32 or bf16 on the CPU"):
        cfg.check_device(torch.device("cpu"))
    for precision in ("fp32", "bf16"):
        cfg.precision = precision
        cfg.check_device(torch.device("cpu"))


def test_config_differences_name_the_keys() -> None:
    old = {"model": {"unet": {"model_channels": 32, "num_heads": 4}}}
    new = {"model": {"unet": {"model_channels": 64, "num_heads": 4}}}
    assert config_differences(old, new) == ["model.unet.model_channels: 32 -> 64"]


# ----------------------------------------------------------------------------- engine pieces


def test_warmup_then_cosine() -> None:
    f = WarmupDecay("cosine", warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert WarmupDecay("constant", 0, 100, 0.0)(57) == 1.0
    assert WarmupDecay("linear", 0, 100, 0.0)(25) == pytest.approx(0.75)


def test_deepspeed_config_and_groups(compose) -> None:
    cfg = _train_config(compose, ["experiment=tiny", "deepspeed=zero3"])
    ds = deepspeed_config(cfg.deepspeed, micro_batch_size=4, gradient_accumulation=2, world_size=2)
    assert ds["train_batch_size"] == 16 and ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] is False and ds["gradient_clipping"] == 1.0
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    module[1].weight.requires_grad_(False)
    groups = parameter_groups({"m": module}, 0.01)
    assert [len(g["params"]) for g in groups] == [1, 2]  # Linear.weight | Linear.bias, LayerNorm.bias
    assert groups[1]["weight_decay"] == 0.0


# ----------------------------------------------------------------------------- data order


def _samples(n: int) -> Samples:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).clone()
    return Samples(images=images, captions=[f"c{i}" for i in range(n)], keys=[str(i) for i in range(n)])


def test_global_order_is_world_size_invariant() -> None:
    samples = _samples(10)
    two = [InMemoryBatches(samples, 7, rank=r, world_size=2, micro_batch_size=2, gradient_accumulation=1)
           for r in range(2)]
    one = InMemoryBatches(samples, 7, rank=0, world_size=1, micro_batch_size=2, gradient_accumulation=2)
    for seen in (0, 4, 8, 12):  # crosses the epoch boundary at 10
        got_two = [c for b in two for mb in b.step_batches(seen) for c in mb["captions"]]
        got_one = [c for mb in one.step_batches(seen) for c in mb["captions"]]
        assert got_two == got_one
    epoch0 = [c for seen in (0, 4) for mb in one.step_batches(seen) for c in mb["captions"]]
    epoch0 += [c for mb in one.step_batches(8) for c in mb["captions"]][:2]
    assert sorted(epoch0) == sorted(f"c{i}" for i in range(10))  # each sample once per epoch
    assert not np.array_equal(GlobalOrder(10, 7).permutation(0), GlobalOrder(10, 7).permutation(1))


def test_state_mismatch_is_refused() -> None:
    batches = InMemoryBatches(_samples(10), 7, rank=0, world_size=1, micro_batch_size=2, gradient_accumulation=1)
    batches.check_state(batches.state_dict(4))
    with pytest.raises(ValueError, match="data position was saved for"):
        batches.check_state({**batches.state_dict(4), "seed": 8})


def _png(color: tuple[int, int, int], size: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_bad_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    good = tmp_path / "a.tar"
    with tarfile.open(good, "w") as tar:
        _add(tar, "0.png", _png((255, 0, 0)))
        _add(tar, "0.txt", b"red")
        _add(tar, "1.png", b"not an image")
        _add(tar, "1.txt", b"broken")
        _add(tar, "2.png", _png((0, 255, 0)))  # no caption
        _add(tar, "3.txt", b"no image")
    truncated = tmp_path / "b.tar"
    with tarfile.open(truncated, "w") as tar:
        _add(tar, "4.png", _png((0, 0, 255)))
        _add(tar, "4.txt", b"blue")
        _add(tar, "5.png", _png((9, 9, 9), 64))
        _add(tar, "5.txt", b"cut")
    truncated.write_bytes(truncated.read_bytes()[:2300])
    samples = load_shards([str(good), str(truncated)], image_size=4, image_keys=["png"], caption_key="txt")
    assert samples.captions == ["red", "blue"]
    assert samples.images.shape == (2, 3, 4, 4) and samples.images[0, 0].eq(255).all()
    assert dict(samples.skipped) == {"undecodable_image": 1, "missing_caption": 1, "missing_image": 1,
                                     "truncated_shard": 1}


# ----------------------------------------------------------------------------- EMA


def test_ema_follows_compvis_litema() -> None:
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    ema = EMA(module, decay=0.99)
    shadow = {n: p.detach().clone() for n, p in module.named_parameters()}
    for n_update in range(5):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        d = min(0.99, (1 + n_update) / (10 + n_update))
        for n, p in module.named_parameters():
            shadow[n] = shadow[n] - (1 - d) * (shadow[n] - p.detach())
    state = ema.state_dict()
    for n in shadow:
        torch.testing.assert_close(state[n], shadow[n], rtol=1e-6, atol=1e-7)
    other = EMA(torch.nn.Linear(3, 2), decay=0.99)
    other.load_state_dict(state, ema.num_updates)
    assert other.num_updates == 5 and all(torch.equal(other.state_dict()[n], state[n]) for n in state)
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"weight": state["weight"]}, 1)


# ----------------------------------------------------------------------------- checkpoint store


class _FakeEngine:
    """Writes one file per save, as DeepSpeed's save_checkpoint does per rank."""

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        assert save_latest is False
        Path(save_dir, tag).mkdir(parents=True, exist_ok=True)
        Path(save_dir, tag, "mp_rank_00_model_states.pt").write_bytes(b"x")


def test_store_pointer_and_keep_last(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ckpt"), tmp_path / "work", rank=0)
    assert store.latest_tag() is None
    for step in (2, 4, 6, 8):
        store.save(_FakeEngine(), {"w": torch.ones(2)}, {"step": step, "world_size": 1})
        store.prune(keep_last=2)
    assert store.latest_tag() == "step00000008"
    assert store.tags() == ["step00000006", "step00000008"]
    assert store.read_state("step00000008")["step"] == 8
    (tmp_path / "ckpt" / "latest").write_text("step00000099\n")
    with pytest.raises(FileNotFoundError, match="points at step00000099"):
        store.latest_tag()


def test_needs_universal() -> None:
    assert not needs_universal({"world_size": 2, "zero_stage": 2, "precision": "fp32"}, 2)
    assert needs_universal({"world_size": 2, "zero_stage": 2, "precision": "fp32"}, 1)
    assert not needs_universal({"world_size": 2, "zero_stage": 0, "precision": "fp32"}, 1)
    assert needs_universal({"world_size": 2, "zero_stage": 0, "precision": "bf16"}, 4)


# ----------------------------------------------------------------------------- one-process runs


def test_one_process_run_writes_its_outputs(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    th.run(run_dir, ["train.max_steps=3", "checkpoint.interval_steps=2", "train.inject_nan_at_steps=[1]"])
    losses = th.losses(run_dir)
    assert sorted(losses) == [1, 2, 3] and all(np.isfinite(losses[s]) for s in (1, 3))
    assert np.isnan(losses[2])  # step index 1 is the second step
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["finished"] and metrics["step"] == 3 and metrics["nan_steps"] == 1
    assert th.latest(run_dir) == "step00000003"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step*")) == ["step00000002", "step00000003"]
    state = json.loads((run_dir / "checkpoints" / "step00000003" / "trainer_state.json").read_text())
    assert state["nan_steps"] == 1 and state["ema_updates"] == 2  # the skipped step updates no EMA
    assert Path(metrics["eval_grid"]).is_file()
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.experiment == "tiny" and saved.train.max_steps == 3
    # The skipped step changed nothing: weights after step 3 equal a run without that step's update.
    assert "non-finite loss" in (run_dir / "train.log").read_text()


def test_consecutive_nan_steps_stop_the_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = th.run(run_dir, ["train.max_steps=6", "train.inject_nan_at_steps=[1,2,3]",
                            "train.max_consecutive_nan_steps=3"], expect=3)
    assert "3 consecutive steps had a non-finite loss (train.max_consecutive_nan_steps=3)" in proc.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["finished"] is False and metrics["step"] == 4 and metrics["nan_steps"] == 3


def test_resume_check_ignores_keys_that_only_choose_the_starting_weights():
    from trainer.config import check_compatible, config_fingerprint

    old = {"model": {"name": "tiny", "init_from": None}, "diffusion": {"prediction": "eps"}}
    state = {"config_fingerprint": config_fingerprint(old), "config": old}
    # A key added since (model.init_from_ema) or another starting point is still the same model.
    check_compatible(state, {"model": {"name": "tiny", "init_from": "x.ckpt", "init_from_ema": False},
                             "diffusion": {"prediction": "eps"}}, allow_change=False)
    with pytest.raises(ValueError, match=r"diffusion.prediction: 'eps' -> 'v'"):
        check_compatible(state, {"model": {"name": "tiny", "init_from": None}, "diffusion": {"prediction": "v"}},
                         allow_change=False)
