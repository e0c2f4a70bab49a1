"""Sampling from checkpoints, export to diffusers / safetensors, import of published weights."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from train_helpers import ROOT, run, train_env

TINY_KL = ["model=tiny_kl", "train.max_steps=2"]
PROMPT = "a red handwritten seven on a white background"


def _cli(module: str, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=train_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == expect, f"{module} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("interchange") / "run"
    run(run_dir, TINY_KL)
    return run_dir


@pytest.fixture(scope="module")
def exported(trained: Path) -> Path:
    out = trained.parent / "diffusers"
    _cli("trainer.export", f"checkpoint={trained}", f"out={out}", "format=diffusers")
    return out


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_sample_writes_images_grid_and_settings(trained: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue handwritten three\na green handwritten one\n")
    out = tmp_path / "samples"
    _cli("trainer.sample", f"checkpoint={trained / 'checkpoints'}", f"prompts_file={prompts}", "n=2", "steps=3",
         "guidance=2", "seed=5", f"out={out}", "batch_size=3")
    meta = json.loads((out / "samples.json").read_text())
    assert [r["seed"] for r in meta["images"]] == [5, 6, 7, 8]
    assert [r["prompt"] for r in meta["images"]] == ["a blue handwritten three"] * 2 + ["a green handwritten one"] * 2
    assert meta["model"]["weights"] == "ema" and meta["model"]["step"] == 2
    assert all(_png(out / r["file"]).shape == (16, 16, 3) for r in meta["images"])
    assert _png(out / "grid.png").shape == (2 * 18 + 2, 2 * 18 + 2, 3)
    # An image depends on its seed, not on the batch it was drawn in.
    one = tmp_path / "one"
    _cli("trainer.sample", f"checkpoint={trained}", "prompt=a green handwritten one", "n=1", "steps=3",
         "guidance=2", "seed=7", f"out={one}")
    assert np.array_equal(_png(one / "00000.png"), _png(out / "00002.png"))


def test_sample_from_a_checkpoint_in_s3(trained: Path, tmp_path: Path, s3_server) -> None:
    import os

    from s3_server import make_bucket, s3_storage_options, upload_tree

    make_bucket(s3_server.endpoint_url, "runs")
    upload_tree(trained / "checkpoints", "s3://runs/tiny/checkpoints", s3_storage_options(s3_server.endpoint_url))
    env = {**train_env(), "AWS_ENDPOINT_URL": s3_server.endpoint_url,
           **{k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}}
    local, remote = tmp_path / "local", tmp_path / "remote"
    for checkpoint, out in ((trained, local), ("s3://runs/tiny/checkpoints", remote)):
        proc = subprocess.run([sys.executable, "-m", "trainer.sample", f"checkpoint={checkpoint}", "prompt=a seven",
                               "n=1", "steps=3", f"out={out}"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.array_equal(_png(local / "00000.png"), _png(remote / "00000.png"))


def test_sample_and_export_take_the_s3_settings(trained: Path, tmp_path: Path, s3_server) -> None:
    """``s3.endpoint_url`` (as ``data.s3`` in training) reaches the store; no AWS_ENDPOINT_URL is set."""
    import os

    from s3_server import make_bucket, s3_storage_options, upload_tree

    make_bucket(s3_server.endpoint_url, "runs3")
    upload_tree(trained / "checkpoints", "s3://runs3/tiny/checkpoints", s3_storage_options(s3_server.endpoint_url))
    env = {**{k: v for k, v in train_env().items() if k != "AWS_ENDPOINT_URL"},
           **{k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}}
    settings = [f"s3.endpoint_url={s3_server.endpoint_url}", "s3.max_attempts=1"]
    local, remote = tmp_path / "local", tmp_path / "remote"
    for checkpoint, out, extra in ((trained, local, []), ("s3://runs3/tiny/checkpoints", remote, settings)):
        proc = subprocess.run([sys.executable, "-m", "trainer.sample", f"checkpoint={checkpoint}", "prompt=a two",
                               "n=1", "steps=3", f"out={out}", *extra], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.array_equal(_png(local / "00000.png"), _png(remote / "00000.png"))
    proc = subprocess.run([sys.executable, "-m", "trainer.export", "checkpoint=s3://runs3/tiny/checkpoints",
                           f"out={tmp_path / 'exported'}", "format=safetensors", *settings], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any((tmp_path / "exported").iterdir())


def test_bad_prompt_lists_fail_before_anything_is_written(trained: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n   \na bird\n\n")
    out = tmp_path / "never"
    proc = _cli("trainer.sample", f"checkpoint={trained}", f"prompts_file={prompts}", f"out={out}", expect=2)
    assert "empty lines [2, 4]" in proc.stderr and not out.exists()
    proc = _cli("trainer.sample", f"checkpoint={tmp_path}", "prompt=x", f"out={out}", expect=2)
    assert "is not a checkpoint" in proc.stderr and not out.exists()


def test_export_loads_in_diffusers_and_draws_the_same_image(trained: Path, exported: Path, tmp_path: Path) -> None:
    from diffusers import LDMTextToImagePipeline

    out = tmp_path / "ours"
    _cli("trainer.sample", f"checkpoint={trained}", f"prompt={PROMPT}", "n=1", "steps=5", "guidance=3", "seed=11",
         f"out={out}")
    pipe = LDMTextToImagePipeline.from_pretrained(str(exported), local_files_only=True)
    # LDMTextToImagePipeline sizes its latents as height // 8 whatever the VAE's factor: for this
    # KL-f4 model, 32 px there are the 4x4 latents of our 16 px images.
    theirs = pipe([PROMPT], height=32, width=32, num_inference_steps=5, guidance_scale=3.0, eta=0.0,
                  generator=torch.Generator().manual_seed(11), output_type="np").images[0]
    theirs = (theirs * 255).round().astype(np.int16)
    ours = _png(out / "00000.png")
    assert np.abs(ours - theirs).max() <= 1  # <= 1/255


def test_import_train_export_keeps_untouched_tensors_bitwise(exported: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "finetune"
    run(run_dir, ["model=tiny_kl", "train.max_steps=1", f"model.init_from={exported}"])
    again = tmp_path / "again"
    _cli("trainer.export", f"checkpoint={run_dir}", f"out={again}", "format=diffusers")
    before = load_file(str(exported / "vqvae" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(again / "vqvae" / "diffusion_pytorch_model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    unet_before = load_file(str(exported / "unet" / "diffusion_pytorch_model.safetensors"))
    unet_after = load_file(str(again / "unet" / "diffusion_pytorch_model.safetensors"))
    assert unet_before.keys() == unet_after.keys()
    assert any(not torch.equal(unet_before[k], unet_after[k]) for k in unet_before)  # it did train
    for name in ("scheduler/scheduler_config.json", "model_index.json", "unet/config.json", "bert/config.json"):
        assert (exported / name).read_text() == (again / name).read_text()


def _components(**unet_overrides):
    """(TrainConfig, ModelComponents) of the tiny latent model, as the trainer builds them."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import trainer.config  # noqa: F401 - registers the train_schema the composed config starts from
    from trainer.interchange import build_networks

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        c = compose(config_name="train", overrides=["experiment=tiny", "model=tiny_kl",
                                                    *[f"model.unet.{k}={v}" for k, v in unet_overrides.items()]])
    cfg = OmegaConf.to_object(c)
    return cfg, build_networks(cfg.model, cfg.train.seed)


def test_import_refuses_another_architecture_and_truncated_files(exported: Path, tmp_path: Path) -> None:
    from trainer.interchange import load_pretrained

    cfg, parts = _components(model_channels=64)
    with pytest.raises(ValueError, match="another architecture"):
        load_pretrained(parts, str(exported), cfg.model)
    cfg, parts = _components()
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_pretrained(parts, str(broken), cfg.model)


def test_compvis_checkpoints_import_without_unpickling(tmp_path: Path) -> None:
    from trainer.interchange import compvis_ldmbert_keymap, load_pretrained

    cfg, src = _components()
    torch.manual_seed(1)
    for p in list(src.unet.parameters()) + list(src.text_encoder.parameters()) + list(src.first_stage.parameters()):
        p.data.normal_()
    text, _ = compvis_ldmbert_keymap(cfg.model.text_encoder.depth).to_theirs(src.text_encoder.state_dict())
    sd = {**{f"model.diffusion_model.{k}": v for k, v in src.unet.state_dict().items()},
          **{f"first_stage_model.{k}": v for k, v in src.first_stage.state_dict().items()},
          **{f"cond_stage_model.transformer.{k}": v for k, v in text.items()},
          "model_ema.decay": torch.tensor(0.9999), "betas": torch.linspace(1e-4, 2e-2, 1000)}
    path = tmp_path / "ldm.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    _, dst = _components()
    summary = load_pretrained(dst, str(path), cfg.model)
    assert summary["dropped"] == ["to_logits.bias", "to_logits.weight"] and summary["ignored"] == 2
    for a, b in ((src.unet, dst.unet), (src.text_encoder, dst.text_encoder), (src.first_stage, dst.first_stage)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # A .ckpt holding a pickled object is refused, never unpickled.
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callback": Path("/")}, ckpt)
    with pytest.raises(ValueError, match="weights_only"):
        load_pretrained(dst, str(ckpt), cfg.model)


def test_export_refuses_pixel_space_and_never_leaves_a_partial_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "pixel"
    run(run_dir, ["train.max_steps=1"])  # the tiny pixel-space model
    out = tmp_path / "export"
    proc = _cli("trainer.export", f"checkpoint={run_dir}", f"out={out}", "format=diffusers", expect=2)
    assert "pixel space" in proc.stderr and not out.exists()
    assert not list(tmp_path.glob(".export.partial-*"))
    _cli("trainer.export", f"checkpoint={run_dir}", f"out={out}", "format=safetensors")
    assert {p.name for p in out.iterdir()} == {"unet.safetensors", "text_encoder.safetensors", "model_config.json"}
    proc = _cli("trainer.export", f"checkpoint={run_dir}", f"out={out}", "format=safetensors", expect=2)
    assert "exists" in proc.stderr


@pytest.mark.slow
def test_live_weights_consolidate_alike_from_every_zero_stage(tmp_path: Path) -> None:
    from trainer.inference import resolve_checkpoint, trained_weights

    weights = {}
    for stage in (0, 3):
        run_dir = tmp_path / f"zero{stage}"
        run(run_dir, [f"deepspeed=zero{stage}", "train.max_steps=2"])
        weights[stage] = trained_weights(resolve_checkpoint(str(run_dir)), use_ema=False)
    assert weights[0].keys() == weights[3].keys()
    assert max((weights[0][k] - weights[3][k]).abs().max().item() for k in weights[0]) < 1e-5


def test_clip_conditioned_model_exports_to_stable_diffusion(tmp_path: Path) -> None:
    """A frozen OpenCLIP tower (ViT-S-16-alt's text tower, random weights saved as a local file, as a
    user's downloaded checkpoint would be) -> StableDiffusionPipeline draws our image."""
    from diffusers import StableDiffusionPipeline

    from trainer.models.text_encoders import FrozenOpenCLIPTextEncoder

    torch.manual_seed(0)
    tower = FrozenOpenCLIPTextEncoder("ViT-S-16-alt", layer="penultimate", allow_random_init=True)
    weights = tmp_path / "open_clip_vit_s16alt.safetensors"
    save_file({k: v.contiguous() for k, v in tower.model.state_dict().items()}, str(weights))
    run_dir = tmp_path / "run"
    run(run_dir, ["model=tiny_kl", "model/text_encoder=openclip_vit_h14", "model.text_encoder.arch=ViT-S-16-alt",
                  f"model.text_encoder.checkpoint_path={weights}", "model.unet.context_dim=256", "train.max_steps=2"])
    out, samples = tmp_path / "sd", tmp_path / "ours"
    _cli("trainer.export", f"checkpoint={run_dir}", f"out={out}", "format=diffusers")
    _cli("trainer.sample", f"checkpoint={run_dir}", f"prompt={PROMPT}", "n=1", "steps=4", "guidance=3", "seed=3",
         f"out={samples}")
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    theirs = pipe(PROMPT, height=16, width=16, num_inference_steps=4, guidance_scale=3.0, eta=0.0,
                  generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    assert np.abs(_png(samples / "00000.png") - (theirs * 255).round().astype(np.int16)).max() <= 1


def _sd_v1_like(tmp_path: Path, overrides: list[str]):
    """The tiny latent model with a frozen OpenAI-CLIP-style tower (ViT-S-16-alt) and no text weights
    file of its own, as model=sd_v1 is configured when the SD checkpoint holds the tower."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import trainer.config  # noqa: F401 - registers the train_schema

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        c = compose(config_name="train", overrides=["experiment=tiny", "model=tiny_kl",
                                                    "model/text_encoder=clip_vit_l14", "model.text_encoder.arch=ViT-S-16-alt",
                                                    "model.unet.context_dim=256", *overrides])
    return OmegaConf.to_object(c)


def _sd_v1_checkpoint(tmp_path: Path, *, with_ema: bool, with_text: bool = True) -> tuple[Path, dict]:
    """A CompVis SD v1 checkpoint of the tiny model: UNet, first stage, the CLIP tower in transformers'
    names with the stale ``position_ids`` buffer real SD v1 files carry, and (full-EMA) ``model_ema.*``."""
    from trainer.convert.clip_text import clip_text_to_transformers
    from trainer.models.config import build_components

    cfg = _sd_v1_like(tmp_path, [])
    torch.manual_seed(5)
    src = build_components(cfg.model, allow_random_init=True, build_tokenizer=False)
    for p in list(src.unet.parameters()) + list(src.text_encoder.parameters()):
        p.data.normal_()
    text, report = clip_text_to_transformers(src.text_encoder.state_dict(), cfg.model.text_encoder)
    length = cfg.model.text_encoder.max_length
    sd = {**{f"model.diffusion_model.{k}": v for k, v in src.unet.state_dict().items()},
          **{f"first_stage_model.{k}": v for k, v in src.first_stage.state_dict().items()}}
    if with_text:
        sd.update({f"cond_stage_model.transformer.{k}": v for k, v in text.items()})
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(length)[None]
    ema_unet = {k: v + 1.0 for k, v in src.unet.state_dict().items()}
    if with_ema:  # CompVis LitEma: the parameter's name without dots, under model_ema.
        sd.update({"model_ema.diffusion_model" + k.replace(".", ""): v for k, v in ema_unet.items()})
        sd["model_ema.num_updates"] = torch.tensor(100)
    path = tmp_path / "sd_v1.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    # What CLIPTextModel cannot hold (the unused text_projection) is not in the file.
    kept_text = {k: v for k, v in src.text_encoder.state_dict().items() if k not in report.dropped}
    return path, {"unet": src.unet.state_dict(), "ema_unet": ema_unet, "text": kept_text}


def test_a_full_sd_checkpoint_needs_no_other_weight_file(tmp_path: Path, caplog) -> None:
    """model=sd_v1 + model.init_from=<SD checkpoint>: the CLIP tower comes from the checkpoint (no
    OpenCLIP file asked for), its stale position_ids buffer is ignored; the UNet is model.diffusion_model.*
    unless model.init_from_ema=true, which takes model_ema.* (and the log says which)."""
    from trainer.interchange import build_networks

    path, want = _sd_v1_checkpoint(tmp_path, with_ema=True)
    with caplog.at_level("INFO", logger="trainer.interchange"):
        parts = build_networks(_sd_v1_like(tmp_path, [f"model.init_from={path}"]).model, seed=0)
    assert all(torch.equal(v, want["unet"][k]) for k, v in parts.unet.state_dict().items())
    text = parts.text_encoder.state_dict()
    assert want["text"] and all(torch.equal(text[k], v) for k, v in want["text"].items())
    assert "UNet weights from model.diffusion_model (the checkpoint also holds model_ema.*" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="trainer.interchange"):
        ema = build_networks(_sd_v1_like(tmp_path, [f"model.init_from={path}", "model.init_from_ema=true"]).model, seed=0)
    assert all(torch.equal(v, want["ema_unet"][k]) for k, v in ema.unet.state_dict().items())
    assert "UNet weights from model_ema" in caplog.text


def test_init_from_ema_and_a_missing_text_tower_are_refused_naming_the_fix(tmp_path: Path) -> None:
    from trainer.interchange import build_networks

    path, _ = _sd_v1_checkpoint(tmp_path, with_ema=False)
    with pytest.raises(ValueError, match="holds no model_ema.* weights .* set model.init_from_ema=false"):
        build_networks(_sd_v1_like(tmp_path, [f"model.init_from={path}", "model.init_from_ema=true"]).model, seed=0)
    (tmp_path / "no_text").mkdir()
    path, _ = _sd_v1_checkpoint(tmp_path / "no_text", with_ema=False, with_text=False)
    with pytest.raises(FileNotFoundError, match="model.text_encoder.checkpoint_path is not set and model.init_from=.* "
                                                "holds no text encoder weights"):
        build_networks(_sd_v1_like(tmp_path, [f"model.init_from={path}"]).model, seed=0)


def _loaded_model(overrides: list[str]):
    """A ``LoadedModel`` of the tiny latent model with perturbed random weights (the UNet's zero-initialised
    output layers would make every image ignore its prompt), as trainer.export receives one."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import trainer.config  # noqa: F401 - registers the train_schema
    from trainer.diffusion import build_diffusion
    from trainer.inference import LoadedModel
    from trainer.interchange import build_networks

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        c = compose(config_name="train", overrides=["experiment=tiny", "model=tiny_kl", *overrides])
    cfg = OmegaConf.to_object(c)
    parts = build_networks(cfg.model, cfg.train.seed)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in list(parts.unet.parameters()) + list(parts.text_encoder.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    for m in (parts.unet, parts.text_encoder, parts.first_stage):
        m.eval().requires_grad_(False)
    return LoadedModel(cfg=cfg, unet=parts.unet, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                       first_stage=parts.first_stage, schedule=build_diffusion(cfg.diffusion).schedule,
                       source={"checkpoint": "test", "tag": "step00000000", "step": 0, "weights": "ema"})


@pytest.mark.parametrize("positions, pipeline_class", [
    (77, "LDMTextToImagePipeline"),   # the paper's text transformer (ldm_1p45b, tiny)
    (16, "StableDiffusionPipeline"),  # the demo's (experiment=demo_latent): LDMTextToImagePipeline pads to 77
])
def test_every_exported_pipeline_draws_our_images_with_and_without_guidance(positions, pipeline_class, tmp_path) -> None:
    from diffusers import DiffusionPipeline

    from trainer.images import to_uint8
    from trainer.interchange import export_diffusers, load_pretrained
    from trainer.models.config import build_components
    from trainer.sampling.pipeline import text_to_image

    model = _loaded_model([f"model.text_encoder.max_length={positions}"])
    out = export_diffusers(model, tmp_path / "pipe")
    pipe = DiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert type(pipe).__name__ == pipeline_class
    assert pipe.tokenizer.model_max_length == positions
    size = model.cfg.data.image_size
    # LDMTextToImagePipeline sizes its latents as height // 8 whatever the VAE's factor (4 here).
    height = size * 8 // model.cfg.model.autoencoder.downsample_factor if pipeline_class.startswith("LDM") else size
    for guidance in (1.0, 3.0):
        ours = to_uint8(text_to_image(model.unet, model.encode_fn(), model.first_stage, [PROMPT], [4],
                                      schedule=model.schedule, latent_shape=model.latent_shape, num_steps=3,
                                      guidance_scale=guidance)).astype(np.int16)[0]
        theirs = pipe([PROMPT], height=height, width=height, num_inference_steps=3, guidance_scale=guidance, eta=0.0,
                      generator=torch.Generator().manual_seed(4), output_type="np").images[0]
        assert np.abs(ours - (theirs * 255).round().astype(np.int16)).max() <= 1  # <= 1/255
    # The folder imports back (model.init_from) bit for bit, whichever pipeline class holds it.
    back = build_components(model.cfg.model)
    load_pretrained(back, str(out), model.cfg.model)
    assert all(torch.equal(v, model.text_encoder.state_dict()[k]) for k, v in back.text_encoder.state_dict().items())
