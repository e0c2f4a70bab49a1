"""The model.conditioning group: text (default), class (CompVis ClassEmbedder + null class) and none
(an unconditional UNet); labels from the data; configs refused before work with the key named."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from data_pipeline.decode import BadSample, LabelSpec, label_of, read_label_map
from data_pipeline.indexed import InMemoryBatches, load_shards
from trainer.config import TrainConfig, check_compatible, config_fingerprint
from trainer.diffusion import SampleGenerators, drop_conditions, drop_labels
from trainer.models.conditioning import ClassEmbedder, ConditioningConfig
from trainer.models.config import ModelConfig, build_components
from trainer.models.unet import UNetConfig, UNetModel

TINY_UNET = dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2],
                 num_heads=4, norm_num_groups=8, in_channels=3, out_channels=3)


def _train_config(compose, overrides: list[str]):
    return OmegaConf.to_object(compose("train", ["experiment=tiny", *overrides]))


CLASS = ["model/conditioning=class", "model.conditioning.num_classes=10", "data.label_key=json:digit"]
NONE = ["model/conditioning=none", "eval.guidance_scales=[1.0]"]


def test_text_default_keeps_the_fingerprint_of_runs_made_before_the_group(compose) -> None:
    config = OmegaConf.to_container(compose("train", ["experiment=tiny"]), resolve=True)
    assert config["model"]["conditioning"]["cross_attn"] == "text"
    before = json.loads(json.dumps(config))
    del before["model"]["conditioning"]  # a run saved before model.conditioning existed
    assert config_fingerprint(config) == config_fingerprint(before)
    check_compatible({"config_fingerprint": config_fingerprint(before), "config": before}, config, allow_change=False)
    other = OmegaConf.to_container(compose("train", ["experiment=tiny", *CLASS]), resolve=True)
    assert config_fingerprint(other) != config_fingerprint(config)
    with pytest.raises(ValueError, match="model.conditioning.cross_attn: 'text' -> 'class'"):
        check_compatible({"config_fingerprint": config_fingerprint(before), "config": before}, other,
                         allow_change=False)


def test_class_and_none_build_no_text_encoder(compose) -> None:
    cls = _train_config(compose, CLASS)
    assert cls.model.conditioning.embed_dim == cls.model.unet.context_dim == 64
    parts = build_components(cls.model, allow_random_init=True)
    assert parts.text_encoder is None and parts.tokenizer is None
    assert parts.class_embedder.embedding.weight.shape == (11, 64)  # + the null class
    assert set(parts.trainable_modules()) == {"unet", "class_embedder"}
    none = _train_config(compose, NONE)
    assert none.model.unet.context_dim is None
    parts = build_components(none.model)
    assert parts.text_encoder is None and parts.class_embedder is None
    names = [n for n, _ in parts.unet.named_modules()]
    assert not any("transformer_blocks" in n or "attn2" in n for n in names)  # no cross-attention
    assert any(n.endswith(".qkv") for n in names)  # CompVis AttentionBlock at the attention resolutions


@pytest.mark.parametrize("overrides, match", [
    (["model.conditioning.cross_attn=clip"], r"model.conditioning.cross_attn='clip' is invalid"),
    (["model/conditioning=class", "data.label_key=json:digit", "model.conditioning.num_classes=0"],
     r"model.conditioning.num_classes=0 is invalid"),
    (["model/conditioning=class", "model.conditioning.num_classes=10", "model.conditioning.embed_dim=32",
      "data.label_key=json:digit"], r"model.unet.context_dim=64 must equal model.conditioning.embed_dim=32"),
    (["model/conditioning=class", "model.conditioning.num_classes=10"], r"data.label_key=None is invalid"),
    (["model/conditioning=class", "model.conditioning.num_classes=7", "data.label_key=json:digit", "eval=digits"],
     r"model.conditioning.num_classes=7 must be 10"),
    (["model/conditioning=none"], r"eval.guidance_scales=\[7.5\] is invalid; allowed: \[1.0\]"),
    (["model.conditioning.cross_attn=none", "eval.guidance_scales=[1.0]"], r"model.unet.context_dim=64 must be null"),
    (["model.conditioning.concat=lowres", "model.conditioning.concat_channels=3"],
     r"model.unet.in_channels=3 must equal the first stage's latent channels 3 .* plus "
     r"model.conditioning.concat_channels=3"),
    (["model.conditioning.concat=lowres"], r"model.conditioning.concat='lowres' with model.conditioning.concat_channels=0"),
])
def test_bad_conditioning_fails_naming_the_key(compose, overrides: list[str], match: str) -> None:
    with pytest.raises(Exception, match=match):
        _train_config(compose, overrides)


def test_label_map_outside_the_classes_fails_before_work(compose, tmp_path: Path) -> None:
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"cat": 0, "dog": 12}))
    with pytest.raises(ValueError, match=r"data.label_map=.* maps 'dog' to 12, outside the classes \[0, 10\)"):
        _train_config(compose, [*CLASS, f"data.label_map={path}"])
    path.write_text(json.dumps({"cat": 0, "dog": 1}))
    assert read_label_map(str(path), 10) == {"cat": 0, "dog": 1}


def test_labels_from_a_json_field_a_member_or_a_map() -> None:
    meta = {"digit": 7}
    assert label_of({}, LabelSpec("json:digit", 10), meta) == 7
    assert label_of({"cls": b" 3\n"}, LabelSpec("cls", 10), None) == 3
    assert label_of({"cls": b"dog"}, LabelSpec("cls", 10, {"cat": 0, "dog": 1}), None) == 1
    for parts, spec, meta, reason in [
        ({}, LabelSpec("json:digit", 10), {"other": 1}, "missing_label"),
        ({}, LabelSpec("cls", 10), None, "missing_label"),
        ({"cls": b"12"}, LabelSpec("cls", 10), None, "bad_label"),  # out of range
        ({"cls": b"dog"}, LabelSpec("cls", 10), None, "bad_label"),  # a name without a map
        ({"cls": b"cow"}, LabelSpec("cls", 10, {"cat": 0}), None, "bad_label"),  # not in the map
        ({}, LabelSpec("json:digit", 10), {"digit": True}, "bad_label"),
    ]:
        with pytest.raises(BadSample) as e:
            label_of(parts, spec, meta)
        assert e.value.reason == reason


def _shard(path: Path, labels: list[object]) -> None:
    from PIL import Image

    with tarfile.open(path, "w") as tar:
        for i, label in enumerate(labels):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_in_memory_batches_carry_labels_and_skip_bad_ones(tmp_path: Path) -> None:
    _shard(tmp_path / "a.tar", [1, 2, "x", 3, 99])
    samples = load_shards([str(tmp_path / "a.tar")], image_size=8, image_keys=["png"], caption_key="txt",
                          caption_required=False, labels=LabelSpec("cls", 10))
    assert samples.labels.tolist() == [1, 2, 3]
    assert samples.skipped["bad_label"] == 2
    batches = InMemoryBatches(samples, 0, rank=0, world_size=1, micro_batch_size=3, gradient_accumulation=1)
    batch = batches.step_batches(0)[0]
    assert batch["labels"].dtype == torch.int64
    order = batches.order.indices(0, 3)
    assert batch["labels"].tolist() == samples.labels[torch.from_numpy(order)].tolist()


def test_class_embedder_null_class_and_label_dropout_draws_like_caption_dropout() -> None:
    embedder = ClassEmbedder(10, 16)
    out = embedder(torch.tensor([0, 9, embedder.null_class]))
    assert out.shape == (3, 1, 16)
    assert torch.equal(out[2, 0], embedder.embedding.weight[10])
    positions = list(range(100, 164))
    labels = torch.arange(64) % 10
    dropped = drop_labels(labels, 10, 0.3, SampleGenerators(0, positions))
    captions = drop_conditions([str(i) for i in range(64)], 0.3, SampleGenerators(0, positions))
    assert [c == "" for c in captions] == (dropped == 10).tolist()  # the same per-sample draws
    assert 5 < int((dropped == 10).sum()) < 35
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])
    # Per sample: one sample's draw does not depend on the batch it is in.
    alone = drop_labels(labels[7:8], 10, 0.3, SampleGenerators(0, positions[7:8]))
    assert alone.item() == dropped[7].item()


def test_unconditional_unet_runs_without_context_and_checks_its_config() -> None:
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig(**TINY_UNET, context_dim=None))
    x = torch.randn(2, 3, 8, 8)
    out = unet(x, torch.tensor([10, 500]))
    assert out.shape == x.shape
    for p in unet.parameters():  # the zero-initialised output convs hide the blocks: open them
        p.data.normal_(0, 0.05)
    out = unet(x, torch.tensor([10, 500]))
    assert out.abs().sum() > 0
    # Self-attention mixes pixels: changing one corner moves the other.
    y = x.clone()
    y[:, :, 0, 0] += 1.0
    assert not torch.allclose(unet(y, torch.tensor([10, 500]))[:, :, -1, -1], out[:, :, -1, -1])
    with pytest.raises(ValueError, match="model.conditioning.cross_attn='class' needs its context width"):
        ModelConfig(unet=UNetConfig(**TINY_UNET, context_dim=None),
                    conditioning=ConditioningConfig(cross_attn="class", num_classes=3, embed_dim=4),
                    **_identity_first_stage())


def _identity_first_stage() -> dict:
    from trainer.models.autoencoder import AutoencoderConfig

    return {"autoencoder": AutoencoderConfig(kind="identity")}


def test_config_of_a_class_run_round_trips(compose) -> None:
    cfg = _train_config(compose, CLASS)
    again = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig),
                                                OmegaConf.to_container(OmegaConf.structured(cfg))))
    assert again.model.conditioning == cfg.model.conditioning
