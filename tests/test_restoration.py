"""Super-resolution and inpainting inputs and metrics (issue 18): degradations and masks drawn from the
sample's generator repeat exactly, have the documented shapes and coverage, and the metrics give known
numbers on known images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.concat import ConcatSettings, concat_channels, make_condition
from data_pipeline.degrade import bicubic_downsample, bicubic_upsample, bsr_light, degrade
from data_pipeline.masks import draw_masks, half_mask, mask_at, masked_images, strokes_boxes_mask
from data_pipeline.demo_digits import DigitClassifier, build_digits_shards
from eval.restoration import (composite, held_out_images, masked_lpips, masked_psnr, restoration_protocol,
                              superres_scores, superres_table, to_uint8)
from trainer.autoencoder_loss import build_lpips
from trainer.models.autoencoder import IdentityFirstStage
from trainer.diffusion import DiffusionConfig, build_diffusion
from trainer.models.unet import UNetConfig, UNetModel
from trainer.sampling.concat import WithConcat, concat_to_image


def _images(seed: int, batch: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_bicubic_downsample_matches_pil_bicubic():
    image = _images(0, batch=1, size=32)[0]
    rgb = ((image + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pil = np.asarray(Image.fromarray(rgb).resize((8, 8), Image.BICUBIC)).astype(np.float64) / 127.5 - 1
    quantised = torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1
    ours = bicubic_downsample(quantised, 4).permute(1, 2, 0).double().numpy()
    assert ours.shape == (8, 8, 3)
    assert np.abs(ours - pil).max() < 1.5 / 127.5  # PIL rounds to uint8


def test_bicubic_shapes_and_errors():
    images = _images(1, batch=3)
    assert bicubic_downsample(images).shape == (3, 3, 4, 4)
    assert bicubic_downsample(images[0]).shape == (3, 4, 4)
    assert bicubic_upsample(bicubic_downsample(images)).shape == images.shape
    assert degrade(images, 4, "bicubic").equal(bicubic_downsample(images, 4))
    with pytest.raises(ValueError, match="factor=3"):
        bicubic_downsample(images, 3)
    with pytest.raises(ValueError, match="degradation='nearest'"):
        degrade(images, 4, "nearest")
    with pytest.raises(ValueError, match="one generator per image"):
        degrade(images, 4, "bsr_light", _gens([0]))


def test_bsr_light_repeats_per_generator_and_differs_across():
    images = _images(2, batch=2, size=32)
    first = degrade(images, 4, "bsr_light", _gens([5, 6]))
    again = degrade(images, 4, "bsr_light", _gens([5, 6]))
    assert first.shape == (2, 3, 8, 8) and first.abs().max() <= 1.0
    assert torch.equal(first, again)
    # A sample's degradation depends on its own generator only, never on the batch around it.
    alone = bsr_light(images[1], 4, torch.Generator().manual_seed(6))
    assert torch.equal(alone, first[1])
    other = degrade(images, 4, "bsr_light", _gens([7, 8]))
    assert not torch.equal(first, other)
    # It is a degradation of the image: closer to the image's bicubic downsampling than to another image's.
    reference = bicubic_downsample(images, 4)
    assert (first[0] - reference[0]).abs().mean() < (first[0] - reference[1]).abs().mean()


def test_strokes_boxes_masks_repeat_and_cover_the_range():
    coverages = []
    for seed in range(40):
        mask = strokes_boxes_mask(32, 32, torch.Generator().manual_seed(seed), min_coverage=0.2, max_coverage=0.4)
        assert mask.shape == (1, 32, 32) and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(mask, strokes_boxes_mask(32, 32, torch.Generator().manual_seed(seed),
                                                    min_coverage=0.2, max_coverage=0.4))
        coverages.append(float(mask.mean()))
    assert min(coverages) >= 0.2 and max(coverages) <= 0.4
    assert max(coverages) - min(coverages) > 0.1  # the fraction is spread over the range, not pinned to a bound
    masks = draw_masks(_gens([1, 2, 3]), 32, 32)
    assert masks.shape == (3, 1, 32, 32) and not torch.equal(masks[0], masks[1])
    with pytest.raises(ValueError, match="min_coverage <= max_coverage"):
        strokes_boxes_mask(32, 32, torch.Generator(), min_coverage=0.6, max_coverage=0.5)
    with pytest.raises(ValueError, match="mask kind='circle'"):
        draw_masks(_gens([0]), 8, 8, "circle")


def test_half_masks_cover_one_half_and_every_side_occurs():
    sides = set()
    for seed in range(30):
        mask = half_mask(16, 16, torch.Generator().manual_seed(seed))
        assert float(mask.mean()) == 0.5
        assert torch.equal(mask, half_mask(16, 16, torch.Generator().manual_seed(seed)))
        sides.add((bool(mask[0, 0, 0]), bool(mask[0, 0, -1]), bool(mask[0, -1, 0])))
    assert len(sides) == 4


def test_masked_image_and_latent_mask_layout():
    images = _images(3, batch=2)
    masks = draw_masks(_gens([0, 1]), 16, 16, "half")
    masked = masked_images(images, masks)
    assert torch.equal(masked[masks.expand_as(images) > 0], torch.zeros(int(masks.sum()) * 3))
    assert torch.equal(masked[masks.expand_as(images) == 0], images[masks.expand_as(images) == 0])
    small = mask_at(masks, (4, 4))
    assert small.shape == (2, 1, 4, 4) and float(small.mean()) == 0.5
    with pytest.raises(ValueError, match=r"expected \(B, C, H, W\) and \(B, 1, H, W\)"):
        masked_images(images, masks[:, :, :8])


def test_superres_scores_known_values():
    # A 1-px checkerboard has no content below Nyquist: anti-aliased x4 downsampling leaves mid-grey, and
    # bicubic upsampling of it misses every pixel by one half of the range: PSNR = 10 log10(255^2 / ~127.5^2).
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    board = (((yy + xx) % 2) * 2.0 - 1.0).expand(1, 3, 16, 16).contiguous()
    baseline = bicubic_upsample(bicubic_downsample(board, 4), 4)
    scores = superres_scores(board, baseline)
    assert scores["psnr"].item() == pytest.approx(6.02, abs=0.1)
    smooth = torch.linspace(-0.5, 0.5, 16).view(1, 1, 1, 16).expand(1, 3, 16, 16).contiguous()
    assert superres_scores(smooth, bicubic_upsample(bicubic_downsample(smooth, 4), 4))["psnr"].item() > 30
    table = superres_table(board, board.clone(), baseline)
    assert table["model"]["psnr"] == float("inf") and table["model"]["ssim"] == pytest.approx(1.0)
    assert table["bicubic"]["psnr"] == pytest.approx(scores["psnr"].item()) and table["bicubic"]["fid"] is None


def test_inpainting_metrics_look_only_inside_the_mask():
    original = _images(4, batch=2, size=32)
    masks = draw_masks(_gens([0, 1]), 32, 32, "half")
    outside_wrong = torch.where(masks > 0, original, -original)  # right inside, wrong outside
    assert torch.equal(composite(original, outside_wrong, masks), original)
    assert torch.isinf(masked_psnr(original, outside_wrong, masks)).all()
    inside_wrong = torch.where(masks > 0, -original, original)
    assert (masked_psnr(original, inside_wrong, masks) < 10).all()
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="random"):
        lpips = build_lpips(random_backbone=True)
    assert masked_lpips(lpips, original, outside_wrong, masks).abs().max() < 1e-6
    assert (masked_lpips(lpips, original, inside_wrong, masks) > 1e-3).all()


def test_concat_inputs_pixel_space_layout_and_repeatability():
    images = _images(5, batch=2)
    identity = IdentityFirstStage()
    lowres = ConcatSettings(kind="lowres", sr_factor=4)
    cond = make_condition(identity, images, None, lowres, (16, 16))
    assert cond.shape == (2, 3, 16, 16)
    assert torch.allclose(cond, bicubic_upsample(bicubic_downsample(images, 4), 4), atol=1e-6)
    assert concat_channels("lowres", 3) == 3 and concat_channels("masked_image", 4) == 5
    inpaint = ConcatSettings(kind="masked_image", mask="strokes_boxes", mask_min_coverage=0.2, mask_max_coverage=0.4)
    cond = make_condition(identity, images, _gens([3, 4]), inpaint, (16, 16))
    assert cond.shape == (2, 4, 16, 16)
    masks = cond[:, :1]  # SD-inpainting's order: mask, then the masked image
    assert torch.equal(cond[:, 1:], images * (1 - masks))
    assert torch.equal(cond, make_condition(identity, images, _gens([3, 4]), inpaint, (16, 16)))
    assert all(0.2 <= float(m.mean()) <= 0.4 for m in masks)
    bsr = ConcatSettings(kind="lowres", degradation="bsr_light")
    assert torch.equal(make_condition(identity, images, _gens([1, 2]), bsr, (16, 16)),
                       make_condition(identity, images, _gens([1, 2]), bsr, (16, 16)))
    with pytest.raises(ValueError, match="model.conditioning.sr_factor=3"):
        make_condition(identity, images, None, ConcatSettings(kind="lowres", sr_factor=3), (16, 16))
    with pytest.raises(ValueError, match="model.conditioning.mask='circle'"):
        ConcatSettings(kind="masked_image", mask="circle")
    with pytest.raises(ValueError, match="model.conditioning.mask_min_coverage"):
        ConcatSettings(kind="masked_image", mask_min_coverage=0.0)


@pytest.fixture(scope="module")
def digits16(tmp_path_factory):
    return build_digits_shards(tmp_path_factory.mktemp("digits16"), image_size=16, samples_per_shard=256, seed=0,
                               val_fraction=0.1)


def test_restoration_protocol_scores_oracle_and_baseline_restorations(digits16):
    images, labels = held_out_images(digits16.val_url, resolution=16, limit=64)
    assert images.shape == (64, 3, 16, 16) and labels.shape == (64,) and images.min() >= -1
    classifier = DigitClassifier.load(digits16.classifier_path)
    low = bicubic_downsample(images, 4)
    baseline = bicubic_upsample(low, 4)
    # A model that outputs the bicubic baseline gains nothing over it; one that returns the originals is exact.
    as_baseline = restoration_protocol("lowres", lambda x, d, s: bicubic_upsample(d, 4), images, low,
                                       baseline=baseline, batch_size=24)
    assert as_baseline["psnr_gain_db"] == pytest.approx(0.0, abs=1e-9)
    assert 10 < as_baseline["rows"]["bicubic"]["psnr"] < 30
    oracle = restoration_protocol("lowres", lambda x, d, s: x, images, low, baseline=baseline)
    assert oracle["rows"]["model"]["psnr"] == float("inf")
    masks = draw_masks(_gens(range(64)), 16, 16, "half")
    seen = []
    kept = restoration_protocol("masked_image", lambda x, d, s: seen.extend(s) or x, images, masks, labels=labels,
                                classifier=classifier, batch_size=24, seed=100)
    assert seen == list(range(100, 164))  # one seed per held-out image, whatever the batching
    expected = float((classifier.predict(to_uint8(images).permute(0, 2, 3, 1).numpy()) == labels).mean())
    assert kept["digit_accuracy"] == pytest.approx(expected) and expected > 0.9
    blank = restoration_protocol("masked_image", lambda x, d, s: torch.zeros_like(x), images, masks, labels=labels,
                                 classifier=classifier)
    assert blank["digit_accuracy"] < expected and blank["digit_accuracy"] == blank["digit_accuracy_masked_input"]


def test_concat_sampling_repeats_the_condition_in_guidance_batches_and_ignores_batching():
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig(in_channels=7, out_channels=3, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                                attention_resolutions=[2], num_heads=2, context_dim=8, norm_num_groups=8)).eval()
    with torch.no_grad():
        for p in unet.out[2].parameters():  # zero-initialised: give the output layer weights
            p.normal_(0, 0.1)
    schedule = build_diffusion(DiffusionConfig()).schedule
    images = _images(6, batch=3, size=8)
    masks = draw_masks(_gens([0, 1, 2]), 8, 8, "half")
    concat = torch.cat([masked_images(images, masks), masks], 1)  # (3, 4, 8, 8)

    def encode(prompts):
        return torch.stack([torch.full((2, 8), float(len(p))) for p in prompts])  # (B, 2, 8)

    kwargs = dict(schedule=schedule, latent_channels=3, num_steps=3, guidance_scale=2.0, device="cpu")
    together = concat_to_image(unet, encode, IdentityFirstStage(), ["a", "bb", "ccc"], [5, 6, 7], concat, batch_size=3,
                               **kwargs)
    alone = concat_to_image(unet, encode, IdentityFirstStage(), ["bb"], [6], concat[1:2], batch_size=1, **kwargs)
    assert together.shape == (3, 3, 8, 8)
    assert torch.allclose(together[1], alone[0], atol=1e-5)
    other = concat_to_image(unet, encode, IdentityFirstStage(), ["bb"], [6], concat[2:3], batch_size=1, **kwargs)
    assert not torch.allclose(alone, other)  # the concat input reaches the UNet
    x = torch.randn(6, 3, 8, 8)
    wrapped = WithConcat(unet, concat)
    t = torch.full((6,), 10)
    context = encode(["a"] * 6)
    assert torch.allclose(wrapped(x, t, context), unet(torch.cat([x, torch.cat([concat, concat])], 1), t, context))
    with pytest.raises(ValueError, match="one of each per sample"):
        concat_to_image(unet, encode, IdentityFirstStage(), ["a"], [0, 1], concat[:2], **kwargs)


# A rank of the sharding check: restoration_protocol with a restorer whose every output is a function of its
# image and seed only (as a sampler's is), recording which seeds this rank restored.
RESTORE_WORKER = r"""
import json, sys
import torch
from data_pipeline.degrade import bicubic_downsample, bicubic_upsample
from data_pipeline.masks import draw_masks
from eval.restoration import restoration_protocol
from trainer.runtime import distributed

out = sys.argv[1]
env = distributed.detect_env()
distributed.init_process_group(env)
images = torch.rand(11, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
seen = []

def restore(x, drawn, seeds):
    seen.extend(seeds)
    noise = torch.stack([torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds])
    return x + 0.2 * noise

low = bicubic_downsample(images, 4)
masks = draw_masks([torch.Generator().manual_seed(i) for i in range(11)], 16, 16, "half")
records = {kind: restoration_protocol(kind, restore, images, drawn, baseline=bicubic_upsample(low, 4), batch_size=3,
                                      seed=100, rank=env.rank, world_size=env.world_size,
                                      gather=distributed.all_gather_object)
           for kind, drawn in (("lowres", low), ("masked_image", masks))}
torch.save({kind: r.pop("outputs") for kind, r in records.items()}, f"{out}/outputs{env.rank}.pt")
with open(f"{out}/rank{env.rank}.json", "w") as f:
    json.dump({"seen": seen, "records": records}, f)
distributed.destroy_process_group()
"""


@pytest.mark.slow  # three interpreters importing torch: ~45 s on a loaded 2-core machine
def test_restoration_protocol_on_two_ranks_restores_half_each_and_scores_as_one(tmp_path):
    """11 images in batches of 3: rank 0 restores global batches 0 and 2, rank 1 batches 1 and 3; both
    gather every output in protocol order and score it, with the one-rank run's numbers and outputs."""
    import json
    import subprocess

    import train_helpers as th

    worker = tmp_path / "restore_worker.py"
    worker.write_text(RESTORE_WORKER)
    got = {}
    for nproc in (1, 2):
        out = tmp_path / f"ranks{nproc}"
        out.mkdir()
        proc = subprocess.run(th.python_command([str(worker), str(out)], nproc), cwd=th.ROOT,
                              env=th.train_env() | {"PYTHONPATH": str(th.ROOT)}, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-5000:]
        got[nproc] = [(json.loads((out / f"rank{r}.json").read_text()),
                       torch.load(out / f"outputs{r}.pt", weights_only=True)) for r in range(nproc)]
    (single, single_outputs), = got[1]
    batches = [list(range(100 + s, min(100 + s + 3, 111))) for s in range(0, 11, 3)]
    assert single["seen"] == [s for _ in range(2) for b in batches for s in b]  # lowres, then masked_image
    for rank, (record, outputs) in enumerate(got[2]):
        assert record["seen"] == [s for _ in range(2) for b in batches[rank::2] for s in b]
        assert record["records"] == single["records"]  # bitwise: the same floats
        assert all(outputs[k].equal(single_outputs[k]) for k in single_outputs)
    assert single["records"]["lowres"]["num_images"] == 11
    assert single["records"]["lowres"]["rows"]["model"]["psnr"] != single["records"]["lowres"]["rows"]["bicubic"]["psnr"]
    assert single["records"]["masked_image"]["masked_psnr"] > 0
