"""The model.conditioning group: text (default), class (CompVis ClassEmbedder + null class) and none
(an unconditional UNet); labels from the data; configs refused before work with the key named."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

import trainer.plan  # noqa: F401  (registers the plan schema)
from corpus import build_clean_corpus, sample_key
from data_pipeline.decode import BadSample, LabelSpec, label_of, read_label_map
from data_pipeline.indexed import InMemoryBatches, load_shards
from data_pipeline.position import SourceInfo
from data_pipeline.stream import EmptySourceError, StreamingBatches, StreamSpec
from trainer.config import TrainConfig, check_compatible, config_fingerprint
from trainer.diffusion import SampleGenerators, drop_conditions, drop_labels
from trainer.models.conditioning import ClassEmbedder, ConditioningConfig
from trainer.models.config import ModelConfig, build_components
from trainer.models.unet import UNetConfig, UNetModel
from trainer.sample import SampleConfig, read_conditions

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


def test_a_label_outside_the_map_is_skipped_and_counted_and_the_first_one_named(tmp_path: Path, caplog) -> None:
    """A sample's label is data: one outside data.label_map (or >= num_classes without a map) is skipped and
    counted, in memory and streamed alike, and the first one is a warning naming the key, the sample, its
    shard and the value; when every label is outside (a wrong map or key: the user's mistake), the job
    fails before training, naming data.label_key and data.label_map."""
    urls = build_clean_corpus(tmp_path / "data", n_shards=2, per_shard=3, labels=("cat", "dog", "cow"))
    names = {"cat": 0, "dog": 1}
    cows = [sample_key(shard, 2) for shard in (0, 1)]  # samples 2 and 5 (label n % 3)
    first = [f"sample {cows[shard]} of {urls[shard]} skipped: bad_label: label 'cow' (data.label_key='json:label') "
             f"is not in data.label_map (further ones are counted as data/skipped_bad_label)" for shard in (0, 1)]
    with caplog.at_level(logging.WARNING):
        samples = load_shards(urls, image_size=8, image_keys=["jpg"], caption_key="txt",
                              labels=LabelSpec("json:label", 2, names))
    assert samples.labels.tolist() == [0, 1, 0, 1] and samples.skipped == {"bad_label": 2}
    assert [r.getMessage() for r in caplog.records if "skipped:" in r.getMessage()] == first[:1]  # in shard order
    caplog.clear()
    spec = StreamSpec(sources=(SourceInfo("default", tuple(urls)),), weights=(1.0,), image_size=8, batch_size=4,
                      shuffle_buffer=0, labels=LabelSpec("json:label", 2, names))
    stream = StreamingBatches(spec, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING):
        batch = stream.next_batch()
    assert sorted(batch["labels"].tolist()) == [0, 0, 1, 1]
    (warned,) = [r.getMessage() for r in caplog.records if "skipped:" in r.getMessage()]
    assert warned in first  # the stream's first shard is a seeded draw

    with pytest.raises(ValueError, match=r"check data.label_key='json:label', data.label_map "
                                         r"\(model.conditioning.num_classes=2\)"):
        load_shards(urls, image_size=8, image_keys=["jpg"], caption_key="txt",
                    labels=LabelSpec("json:label", 2, {"bird": 0}))
    wrong = StreamSpec(sources=spec.sources, weights=(1.0,), image_size=8, batch_size=4, shuffle_buffer=0,
                       labels=LabelSpec("json:label", 2, {"bird": 0}))
    with pytest.raises(EmptySourceError, match=r"data.label_key='json:label', data.label_map "
                                               r"\(model.conditioning.num_classes=2\)"):
        StreamingBatches(wrong, rank=0, world_size=1).next_batch()
    with pytest.raises(BadSample, match=r"class 12 \(data.label_key='cls'\) is outside \[0, 10\) of "
                                        r"model.conditioning.num_classes"):
        label_of({"cls": b"12"}, LabelSpec("cls", 10), None)


def _run(cross_attn: str, num_classes: int = 0) -> SimpleNamespace:
    return SimpleNamespace(model=SimpleNamespace(conditioning=ConditioningConfig(
        cross_attn=cross_attn, num_classes=num_classes, embed_dim=4 if num_classes else 0)))


def test_sampling_asks_each_model_for_its_own_condition_before_weights_are_loaded() -> None:
    """trainer.sample reads the run's config only (run_config), then refuses a condition the model was not
    trained on, naming the key: classes= on a text or an unconditional model, a prompt on a class model."""
    text, classes, none = _run("text"), _run("class", 10), _run("none")
    with pytest.raises(ValueError, match=r"classes=\[3\]: checkpoint='ck' is not a class-conditional model "
                                         r"\(model.conditioning.cross_attn='text'\); give prompt="):
        read_conditions(SampleConfig(checkpoint="ck", classes=3), text)
    with pytest.raises(ValueError, match=r"classes=\[3\]: .* an unconditional model takes no condition"):
        read_conditions(SampleConfig(checkpoint="ck", classes=3), none)
    with pytest.raises(ValueError, match=r"prompt=/prompts_file=: checkpoint='ck' is a class-conditional model "
                                         r"\(model.conditioning.cross_attn='class', 10 classes\); give classes="):
        read_conditions(SampleConfig(checkpoint="ck", prompt="a cat"), classes)
    with pytest.raises(ValueError, match=r"classes=\[2, 10\] has \[10\], outside the model's classes 0..9"):
        read_conditions(SampleConfig(checkpoint="ck", classes=[2, 10]), classes)
    with pytest.raises(ValueError, match=r"classes=\.\.\. is missing"):
        read_conditions(SampleConfig(checkpoint="ck"), classes)
    with pytest.raises(ValueError, match="prompt=/prompts_file=: .* unconditional model"):
        read_conditions(SampleConfig(checkpoint="ck", prompt="a cat"), none)
    assert read_conditions(SampleConfig(checkpoint="ck", classes=[1, 5], n=2), classes) == ([1, 1, 5, 5], 10)
    assert read_conditions(SampleConfig(checkpoint="ck", prompt="a cat", n=2), text) == (["a cat", "a cat"], "")


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


# ----------------------------------------------------------------------------- presets, diffusers

# UNet parameters of the paper's hyperparameter tables (Rombach et al. 2022, Tab. 12 unconditional
# LSUN-Bedrooms LDM-4: 274M; Tab. 14 / App. E class-conditional ImageNet LDM-4: 400M), exact counts as
# built from the CompVis YAMLs' architecture and, independently, by diffusers from the same settings.
PRESET_UNET = {"cin_ldm4": 400_920_579, "lsun_ldm4": 274_056_163}


@pytest.mark.parametrize("preset", sorted(PRESET_UNET))
def test_real_size_presets_match_the_paper_and_diffusers(compose, preset: str) -> None:
    diffusers = pytest.importorskip("diffusers")
    from trainer.convert.diffusers_unet import diffusers_unet2d_config, diffusers_unet_config
    from trainer.models.config import count_parameters

    model = OmegaConf.to_object(compose("plan", [f"model={preset}"])).model
    parts = build_components(model, device="meta")
    n = count_parameters(parts.unet)
    assert n == PRESET_UNET[preset]
    assert round(n / 1e6, -1 if preset == "cin_ldm4" else 0) == {"cin_ldm4": 400, "lsun_ldm4": 274}[preset]
    with torch.device("meta"):
        if model.conditioning.cross_attn == "none":
            theirs = diffusers.UNet2DModel(**diffusers_unet2d_config(model.unet))
        else:
            theirs = diffusers.UNet2DConditionModel(**diffusers_unet_config(model.unet))
    assert count_parameters(theirs) == n
    if preset == "cin_ldm4":  # 1000 classes + the null class, 512 wide
        assert count_parameters(parts.class_embedder) == 1001 * 512


def test_plan_prints_the_class_embedder_and_no_text_encoder(compose) -> None:
    from trainer.plan import render_plan

    text = render_plan(OmegaConf.to_object(compose("plan", ["model=cin_ldm4"])))
    assert "400,920,579" in text and "class_embedder" in text and "512,512" in text
    assert "text_encoder  " not in text.split("training FLOPs")[0]


def _uncond_tiny_kl(compose):
    from trainer.diffusion import build_diffusion
    from trainer.inference import LoadedModel
    from trainer.interchange import build_networks

    cfg = _train_config(compose, ["model=tiny_kl", *NONE])
    parts = build_networks(cfg.model, 0)
    for p in parts.unet.parameters():  # open the zero-initialised convs so every block shows
        p.data.normal_(0, 0.05)
    return LoadedModel(cfg=cfg, unet=parts.unet.eval(), text_encoder=None, tokenizer=None,
                       first_stage=parts.first_stage.eval(), schedule=build_diffusion(cfg.diffusion).schedule,
                       source={"checkpoint": "test", "tag": "t", "step": 0, "weights": "ema"})


def test_unconditional_unet_matches_diffusers_unet2d_both_ways() -> None:
    diffusers = pytest.importorskip("diffusers")
    from trainer.convert.diffusers_unet import diffusers_unet2d_config, unet2d_from_diffusers, unet2d_to_diffusers

    cfg = UNetConfig(model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1, attention_resolutions=[2, 4],
                     num_heads=-1, num_head_channels=16, norm_num_groups=8, in_channels=3, out_channels=3,
                     context_dim=None)
    torch.manual_seed(0)
    ours = UNetModel(cfg)
    for p in ours.parameters():
        p.data.normal_(0, 0.05)
    theirs = diffusers.UNet2DModel(**diffusers_unet2d_config(cfg))
    sd, report = unet2d_to_diffusers(ours.state_dict(), cfg)
    assert report.ok
    theirs.load_state_dict(sd, strict=True)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        a, b = ours(x, t), theirs(x, t).sample
    assert a.abs().mean() > 1e-2
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    back, report = unet2d_from_diffusers(theirs.state_dict(), cfg)
    assert report.ok and back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_unconditional_export_is_an_ldm_pipeline_that_samples_like_ours(compose, tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    from trainer.interchange import export_diffusers
    from trainer.sampling.pipeline import text_to_image

    model = _uncond_tiny_kl(compose)
    out = export_diffusers(model, tmp_path / "ldm")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "LDMPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]
    pipe = diffusers.LDMPipeline.from_pretrained(str(out))
    steps = 4
    theirs = pipe(batch_size=1, generator=torch.Generator().manual_seed(5), num_inference_steps=steps, eta=0.0,
                  output_type="np").images  # (1, H, W, 3) in [0, 1]
    ours = text_to_image(model.unet, lambda c: None, model.first_stage, [None], [5], schedule=model.schedule,
                         latent_shape=model.latent_shape, sampler="ddim", num_steps=steps)  # (1, 3, H, W) in [-1, 1]
    ours01 = ((ours + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert ours01.shape == theirs.shape
    assert float(abs(ours01 - theirs).max()) < 1e-4


def test_streamed_batches_carry_labels() -> None:
    import numpy as np

    from data_pipeline.stream import StreamSpec, collate

    spec = StreamSpec(sources=(), weights=(), image_size=8, batch_size=2, labels=LabelSpec("json:digit", 10))
    examples = [{"caption": "", "key": f"k{i}", "id": (0, i), "position": i, "original_size": (8, 8),
                 "crop_top_left": (0, 0), "image": np.zeros((8, 8, 3), np.uint8), "label": label}
                for i, label in enumerate([4, 9])]
    batch = collate(spec, examples)
    assert batch["labels"].tolist() == [4, 9] and batch["labels"].dtype == torch.int64
    assert "labels" not in collate(StreamSpec(sources=(), weights=(), image_size=8, batch_size=2), examples)
