"""Super-resolution and inpainting models in and out of diffusers (issue 18, item 5): the exported
``LDMSuperResolutionPipeline`` and ``StableDiffusionInpaintPipeline`` draw the images ``trainer.sample``
draws from the same seeds, with and without text guidance, and import back through ``model.init_from``;
the UNet's concat channels and the class embedding's context equal diffusers' models with the same
weights; what has no diffusers pipeline is refused naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import trainer.config  # noqa: F401 - registers the train_schema
from trainer.diffusion import build_diffusion
from trainer.inference import LoadedModel
from trainer.interchange import build_networks, export_diffusers, load_pretrained
from trainer.models.config import build_components
from trainer.sampling.concat import concat_to_image
from data_pipeline.concat import lowres_to_latent_size, masked_image_condition

diffusers = pytest.importorskip("diffusers")

PROMPT = "a handwritten seven"
# 4x super-resolution on a 3-channel tiny KL-f4 first stage, with a latent scale and shift the export folds
# into the first stage (LDMSuperResolutionPipeline decodes latents as they are).
SUPERRES = ["model=tiny_kl", "model/conditioning=none", "model.unet.context_dim=null", "model.unet.in_channels=6",
            "model.unet.out_channels=3", "model.autoencoder.embed_dim=3", "model.autoencoder.z_channels=3",
            "model.autoencoder.scale_factor=0.37", "model.autoencoder.shift_factor=0.11",
            "model.conditioning.concat=lowres", "model.conditioning.concat_channels=3", "eval.guidance_scales=[1.0]"]
# Text-guided inpainting, SD-inpainting's layout: 4 noisy + 1 mask + 4 masked-image latent channels.
INPAINT = ["model=tiny_kl", "model.unet.in_channels=9", "model.conditioning.concat=masked_image",
           "model.conditioning.concat_channels=5", "model.autoencoder.scale_factor=0.8",
           "model.text_encoder.max_length=16"]


def _loaded(compose, overrides: list[str]) -> LoadedModel:
    """The tiny model of ``overrides`` with perturbed random weights (the zero-initialised output layers
    would hide every block), as trainer.export receives one."""
    cfg = OmegaConf.to_object(compose("train", ["experiment=tiny", *overrides]))
    parts = build_networks(cfg.model, cfg.train.seed)
    torch.manual_seed(2)
    nets = [parts.unet, parts.first_stage] + ([parts.text_encoder] if parts.text_encoder is not None else [])
    with torch.no_grad():
        for p in parts.unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    for m in nets:
        m.eval().requires_grad_(False)
    return LoadedModel(cfg=cfg, unet=parts.unet, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                       first_stage=parts.first_stage, schedule=build_diffusion(cfg.diffusion).schedule,
                       source={"checkpoint": "test", "tag": "t", "step": 0, "weights": "ema"})


def _to01(images: torch.Tensor):
    return ((images + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)


# The same on a tiny VQ first stage (CompVis LDM-SR's kind): the scale and shift fold into the codebook too.
SUPERRES_VQ = [*SUPERRES, "model.autoencoder.kind=vq", "model.autoencoder.double_z=false",
               "model.autoencoder.n_embed=64"]


@pytest.mark.parametrize("overrides, first_stage", [(SUPERRES, "AutoencoderKL"), (SUPERRES_VQ, "VQModel")])
def test_superres_exports_an_ldm_superresolution_pipeline_that_samples_like_ours(compose, tmp_path: Path, overrides,
                                                                                first_stage) -> None:
    model = _loaded(compose, overrides)
    out = export_diffusers(model, tmp_path / "sr")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "LDMSuperResolutionPipeline" and index["vqvae"] == ["diffusers", first_stage]
    assert json.loads((out / "vqvae" / "config.json").read_text())["scaling_factor"] == 1.0
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert type(pipe).__name__ == "LDMSuperResolutionPipeline"
    size = model.cfg.data.image_size
    torch.manual_seed(0)
    low = torch.rand(1, 3, size // 4, size // 4) * 2 - 1  # the low-resolution image, at the latent size
    concat = lowres_to_latent_size(low, tuple(model.latent_shape[1:]))
    assert torch.equal(concat, low)
    ours = concat_to_image(model.unet, lambda c: None, model.first_stage, [None], [5], concat, schedule=model.schedule,
                           latent_channels=3, num_steps=4)
    theirs = pipe(image=low, num_inference_steps=4, eta=0.0, generator=torch.Generator().manual_seed(5),
                  output_type="np").images
    assert float(abs(_to01(ours) - theirs).max()) < 1e-4
    # model.init_from of the folder: the UNet bit for bit, the first stage unfolded back to our scale.
    back = build_components(model.cfg.model)
    load_pretrained(back, str(out), model.cfg.model)
    assert all(torch.equal(v, model.unet.state_dict()[k]) for k, v in back.unet.state_dict().items())
    z = torch.randn(1, *model.latent_shape)
    torch.testing.assert_close(back.first_stage.decode(back.first_stage.from_latent(z)),
                               model.first_stage.decode(model.first_stage.from_latent(z)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_inpainting_exports_a_stable_diffusion_inpaint_pipeline_that_samples_like_ours(compose, tmp_path, guidance):
    from data_pipeline.masks import draw_masks

    model = _loaded(compose, INPAINT)
    out = export_diffusers(model, tmp_path / "inpaint")
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline"
    size = model.cfg.data.image_size
    torch.manual_seed(1)
    image = torch.rand(1, 3, size, size) * 2 - 1
    mask = draw_masks([torch.Generator().manual_seed(3)], size, size, "half")  # (1, 1, H, W), 1 = fill
    concat = masked_image_condition(model.first_stage, image, mask)  # (1, 1 + 4, h, w): mask, masked latent
    ours = concat_to_image(model.unet, model.encode_fn(), model.first_stage, [PROMPT], [4], concat,
                           schedule=model.schedule, latent_channels=4, num_steps=3, guidance_scale=guidance)
    # The masked image's latent as ours (diffusers would draw a posterior sample; we take the mode).
    theirs = pipe([PROMPT], image=(image + 1) / 2, mask_image=mask, masked_image_latents=concat[:, 1:], height=size,
                  width=size, strength=1.0, num_inference_steps=3, guidance_scale=guidance, eta=0.0,
                  generator=torch.Generator().manual_seed(4), output_type="np").images
    assert float(abs(_to01(ours) - theirs).max()) < 1e-4
    back = build_components(model.cfg.model)
    load_pretrained(back, str(out), model.cfg.model)
    assert all(torch.equal(v, model.unet.state_dict()[k]) for k, v in back.unet.state_dict().items())


def test_concat_channels_and_class_context_equal_diffusers_unets(compose) -> None:
    """Our UNet on cat(x, concat) and with the class embedder's one-token context is diffusers'
    ``UNet2DConditionModel`` with the converted weights (conv_in's extra channels in the same order)."""
    from trainer.convert.diffusers_unet import diffusers_unet_config, unet_to_diffusers

    for overrides in (INPAINT, ["model=tiny_kl", "model/conditioning=class", "model.conditioning.num_classes=10",
                                "data.label_key=json:digit"]):
        model = _loaded(compose, overrides)
        ucfg = model.cfg.model.unet
        theirs = diffusers.UNet2DConditionModel(**diffusers_unet_config(ucfg)).eval()
        sd, report = unet_to_diffusers(model.unet.state_dict(), ucfg)
        assert report.ok
        theirs.load_state_dict(sd, strict=True)
        torch.manual_seed(7)
        h = w = model.latent_shape[1]
        x, t = torch.randn(2, ucfg.in_channels, h, w), torch.tensor([5, 800])
        if model.cfg.model.conditioning.cross_attn == "class":
            parts = build_networks(model.cfg.model, 0)
            parts.class_embedder.embedding.weight.data.normal_()
            context = parts.class_embedder(torch.tensor([3, 10]))  # a class and the null class: (2, 1, D)
        else:
            context = model.encode_fn()([PROMPT, ""])
        with torch.no_grad():
            a, b = model.unet(x, t, context), theirs(x, t, encoder_hidden_states=context).sample
        assert a.abs().mean() > 1e-2
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_what_diffusers_has_no_pipeline_for_is_refused_naming_the_key(compose, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model.conditioning.sr_factor=2 differs"):
        export_diffusers(_loaded(compose, [*SUPERRES, "model.conditioning.sr_factor=2"]), tmp_path / "a")
    with pytest.raises(ValueError, match="StableDiffusionInpaintPipeline.*needs text"):
        export_diffusers(_loaded(compose, ["model=tiny_kl", "model/conditioning=none", "model.unet.context_dim=null",
                                           "model.unet.in_channels=9", "model.conditioning.concat=masked_image",
                                           "model.conditioning.concat_channels=5", "eval.guidance_scales=[1.0]"]),
                         tmp_path / "b")
    with pytest.raises(ValueError, match="concat='lowres' with cross_attn 'text'"):
        export_diffusers(_loaded(compose, ["model=tiny_kl", "model.unet.in_channels=7",
                                           "model.conditioning.concat=lowres",
                                           "model.conditioning.concat_channels=3"]), tmp_path / "c")
    assert not any(tmp_path.iterdir())  # nothing half-written
