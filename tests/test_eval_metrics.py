"""Issue 7's metric layer: FID / KID / CLIP score against outside implementations (pytorch-fid's
scipy FID, torchmetrics' KID and CLIP score), the Inception / digit / OpenCLIP extractors on
random weights of the real architectures, and cached reference statistics."""

import io
import json
import types
import warnings

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from data_pipeline.demo_digits import DigitClassifier, to_classifier_input
from data_pipeline.writer import ShardWriter
from eval.clip_score import ClipScorer
from eval.features import (
    INCEPTION_WEIGHTS_FILE,
    INCEPTION_WEIGHTS_URL,
    DigitFeatures,
    InceptionFeatures,
    build_feature_extractor,
)
from eval.metrics import FeatureStats, clip_score, feature_stats, frechet_distance, kid
from eval.reference import reference_stats, square_rgb
from eval_helpers import write_random_inception_weights


def _rng(seed=0):
    return np.random.default_rng(seed)


def _uint8_images(num, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num, 3, height, width), dtype=torch.uint8, generator=g)


# ----------------------------------------------------------------------------- FID


def _pytorch_fid(a: FeatureStats, b: FeatureStats) -> float:
    from pytorch_fid.fid_score import calculate_frechet_distance

    with warnings.catch_warnings():  # scipy's sqrtm warns on the singular products tested here
        warnings.simplefilter("ignore")
        return float(calculate_frechet_distance(a.mu, a.sigma, b.mu, b.sigma))


def test_feature_stats_are_mean_and_unbiased_covariance_for_numpy_and_torch():
    x = _rng().standard_normal((40, 5))
    stats = feature_stats(x)
    np.testing.assert_allclose(stats.mu, x.mean(axis=0), rtol=0, atol=1e-15)
    np.testing.assert_allclose(stats.sigma, (x - x.mean(0)).T @ (x - x.mean(0)) / 39, rtol=1e-12)
    assert stats.num_samples == 40 and stats.sigma.dtype == np.float64
    from_torch = feature_stats(torch.from_numpy(x).float())
    np.testing.assert_allclose(from_torch.sigma, stats.sigma, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats(x[:1])


@pytest.mark.parametrize("case", ["well_conditioned", "fewer_samples_than_dims", "rank_deficient"])
def test_fid_matches_pytorch_fid(case):
    rng = _rng(1)
    if case == "well_conditioned":
        a, b = rng.standard_normal((300, 16)), 1.3 * rng.standard_normal((250, 16)) + 0.4
    elif case == "fewer_samples_than_dims":  # both covariances singular (rank 9 and 11 in 32-d)
        a, b = rng.standard_normal((10, 32)), 1.2 * rng.standard_normal((12, 32)) + 0.3
    else:  # features living in a 3-d subspace of 8-d
        basis = rng.standard_normal((3, 8))
        a, b = rng.standard_normal((60, 3)) @ basis, 1.5 * rng.standard_normal((50, 3)) @ basis + 0.2
    sa, sb = feature_stats(a), feature_stats(b)
    ours, ref = frechet_distance(sa, sb), _pytorch_fid(sa, sb)
    assert ref > 0.1
    assert ours == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(sb, sa) == pytest.approx(ours, rel=1e-6)  # sqrt of ~0 eigenvalues: ~1e-8 noise


def test_fid_matches_pytorch_fid_at_inception_dimension():
    rng = _rng(2)
    a = rng.standard_normal((300, 2048))
    b = 0.8 * rng.standard_normal((300, 2048)) + 0.05
    sa, sb = feature_stats(a), feature_stats(b)
    assert frechet_distance(sa, sb) == pytest.approx(_pytorch_fid(sa, sb), rel=1e-6)


def test_fid_of_a_distribution_with_itself_is_zero_and_grows_with_a_shift():
    x = _rng(3).standard_normal((200, 12))
    stats = feature_stats(x)
    # 200 samples in 12 dimensions: sigma is well conditioned, so sigma @ sigma has no zero eigenvalue
    # whose rounding the square root would amplify; the result is 0 up to ~D eps Tr(sigma) (<< 1e-9).
    assert abs(frechet_distance(stats, stats)) < 1e-9 * np.trace(stats.sigma)
    shifted = feature_stats(x + 0.5)
    assert frechet_distance(stats, shifted) == pytest.approx(12 * 0.25, rel=1e-9)  # ||mu diff||^2 only


def test_fid_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match=r"16 vs 2048"):
        frechet_distance(feature_stats(_rng().standard_normal((5, 16))),
                         feature_stats(_rng().standard_normal((5, 2048))))


# ----------------------------------------------------------------------------- KID


def test_kid_equals_torchmetrics_kernel_inception_distance_on_the_same_features():
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = _rng(4)
    real = torch.from_numpy(rng.standard_normal((60, 8)))
    fake = torch.from_numpy(rng.standard_normal((50, 8)) + 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "will save all extracted features in buffer"
        metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=7, subset_size=30)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)  # torchmetrics draws its subsets from the global generator
        tm_mean, tm_std = metric.compute()
    mean, std = kid(real, fake, num_subsets=7, subset_size=30, seed=11)
    assert mean == pytest.approx(float(tm_mean), rel=1e-12)
    assert std == pytest.approx(float(tm_std), rel=1e-12)
    assert kid(real, fake, num_subsets=7, subset_size=30, seed=12) != (mean, std)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    rng = _rng(5)
    a, b = rng.standard_normal((400, 16)), rng.standard_normal((400, 16))
    same_mean, same_std = kid(a, b, num_subsets=20, subset_size=200)
    shifted_mean, _ = kid(a, b + 0.5, num_subsets=20, subset_size=200)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shifted_mean > 50 * max(abs(same_mean), same_std)


def test_kid_clips_the_subset_size_and_rejects_tiny_sets():
    rng = _rng(6)
    a, b = rng.standard_normal((20, 4)), rng.standard_normal((30, 4))
    assert kid(a, b, num_subsets=3, subset_size=1000) == kid(a, b, num_subsets=3, subset_size=20)
    with pytest.raises(ValueError, match="must be >= 2"):
        kid(a[:1], b)
    with pytest.raises(ValueError, match="4 vs 5"):
        kid(a, rng.standard_normal((30, 5)))


# ----------------------------------------------------------------------------- CLIP score


class _StandInClip(torch.nn.Module):
    """What torchmetrics' ``_clip_score_update`` calls on a HF CLIP model, serving fixed embeddings."""

    def __init__(self, text_table):
        super().__init__()
        self.config = types.SimpleNamespace()
        self.text_table = text_table

    def get_image_features(self, pixel_values):
        return pixel_values.flatten(1)

    def get_text_features(self, input_ids, attention_mask):
        return self.text_table[input_ids[:, 0]]


def test_clip_score_equals_torchmetrics_formula_with_per_pair_clamp():
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update

    g = torch.Generator().manual_seed(0)
    image_embeds = torch.randn(6, 16, generator=g, dtype=torch.float64)
    text_embeds = 3.0 * torch.randn(6, 16, generator=g, dtype=torch.float64)
    text_embeds[0] = -2.0 * image_embeds[0]  # cos = -1: clamped to 0
    text_embeds[1] = 5.0 * image_embeds[1]  # cos = 1: 100
    texts = [f"caption {i}" for i in range(6)]

    def processor(images=None, text=None, return_tensors="pt", padding=True):
        if images is not None:
            return {"pixel_values": torch.stack(images)}
        ids = torch.tensor([[texts.index(t)] for t in text])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    images = list(image_embeds[:, :, None, None])  # (E, 1, 1) "images" the stand-in flattens back
    tm_scores, count = _clip_score_update(images, texts, _StandInClip(text_embeds), processor)
    ours = clip_score(image_embeds, text_embeds)
    assert count == 6 and ours.shape == (6,)
    torch.testing.assert_close(ours, tm_scores.clamp(min=0), rtol=1e-12, atol=1e-12)
    assert ours[0] == 0 and ours[1] == pytest.approx(100.0, rel=1e-12)
    assert tm_scores[0] < 0  # torchmetrics only clamps the mean; the metric here clamps each pair
    with pytest.raises(ValueError, match="same shape"):
        clip_score(image_embeds, text_embeds[:5])


# ----------------------------------------------------------------------------- Inception


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_FILE, seed=0)


@pytest.fixture(scope="module")
def inception(inception_weights):
    return InceptionFeatures(inception_weights, resize="torch_bilinear")


@pytest.fixture(scope="module")
def inception_pil(inception_weights):
    return InceptionFeatures(inception_weights, resize="pil_bicubic")


def test_inception_loads_the_local_file_into_torch_fidelitys_module(inception, inception_weights):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    assert isinstance(inception.module, tf_inception.FeatureExtractorInceptionV3)
    saved = torch.load(inception_weights, weights_only=True)
    loaded = inception.module.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k].to(loaded[k].dtype), loaded[k]) for k in saved)
    info = inception.describe()
    assert (info["dim"], info["resize"], info["weights_file"]) == (2048, "torch_bilinear", INCEPTION_WEIGHTS_FILE)
    assert len(info["weights_sha256"]) == 64 and info["official_weights"] is False


@pytest.mark.parametrize("size", [64, 299])
def test_inception_features_are_2048_float64_and_depend_on_the_image(inception, size):
    features = inception(_uint8_images(3, size, size, seed=size))
    assert features.shape == (3, 2048) and features.dtype == np.float64
    assert np.isfinite(features).all()
    assert np.abs(features[0] - features[1]).max() > 1e-3  # different images, different features


def test_resize_policies_differ_below_299_and_agree_at_299(inception, inception_pil):
    small = _uint8_images(3, 64, 64, seed=1)
    assert np.abs(inception(small) - inception_pil(small)).max() > 1e-3
    native = _uint8_images(2, 299, 299, seed=2)
    # At 299 PIL's resize is a copy and torch-fidelity's TF1 bilinear samples every pixel exactly.
    np.testing.assert_allclose(inception_pil(native), inception(native), rtol=0, atol=1e-6)


def test_inception_batches_give_the_same_features(inception_weights, inception):
    images = _uint8_images(5, 48, 40, seed=3)
    batched = InceptionFeatures(inception_weights, batch_size=2)
    np.testing.assert_allclose(batched(images), inception(images), rtol=0, atol=1e-5)


def test_inception_missing_weights_name_the_file_and_where_to_get_it(tmp_path):
    missing = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(FileNotFoundError) as err:
        InceptionFeatures(missing)
    message = str(err.value)
    for needle in (str(missing), INCEPTION_WEIGHTS_FILE, INCEPTION_WEIGHTS_URL, "eval.inception_weights"):
        assert needle in message


def test_inception_rejects_files_that_are_not_its_weights(tmp_path, inception_weights):
    linear = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(3, 2).state_dict(), linear)
    with pytest.raises(ValueError, match=r"linear\.pth.*missing keys.*Conv2d_1a_3x3") as err:
        InceptionFeatures(linear)
    assert "unexpected keys: ['weight', 'bias']" in str(err.value)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=r"garbage\.pth cannot be read"):
        InceptionFeatures(garbage)

    not_tensors = tmp_path / "config.pth"
    torch.save({"lr": 0.1}, not_tensors)
    with pytest.raises(ValueError, match=r"config\.pth holds a dict, not"):
        InceptionFeatures(not_tensors)

    reshaped = tmp_path / "reshaped.pth"
    state = torch.load(inception_weights, weights_only=True)
    state["fc.weight"] = state["fc.weight"][:1000]
    torch.save(state, reshaped)
    with pytest.raises(ValueError, match=r"reshaped\.pth.*shape mismatches.*fc\.weight: \(1000, 2048\)"):
        InceptionFeatures(reshaped)


def test_invalid_resize_policy_names_the_key(inception_weights):
    with pytest.raises(ValueError, match=r"eval\.resize='bilinear'.*torch_bilinear, pil_bicubic"):
        InceptionFeatures(inception_weights, resize="bilinear")


# ----------------------------------------------------------------------------- digit features


@pytest.fixture(scope="module")
def digit_classifier_path(tmp_path_factory):
    rng = _rng(7)
    classifier = DigitClassifier(hidden_weight=rng.standard_normal((64, 16)) * 0.1,
                                 hidden_bias=rng.standard_normal(16) * 0.1,
                                 output_weight=rng.standard_normal((16, 10)), output_bias=rng.standard_normal(10))
    path = tmp_path_factory.mktemp("digits") / "digit_classifier.json"
    classifier.save(path)
    return path


def test_digit_features_are_the_classifier_hidden_layer(digit_classifier_path):
    extractor = DigitFeatures(digit_classifier_path)
    classifier = DigitClassifier.load(digit_classifier_path)
    images = _uint8_images(4, 32, 32, seed=4)
    features = extractor(images)
    assert features.shape == (4, 16) and extractor.dim == 16 and features.dtype == np.float64
    digits = to_classifier_input(images.numpy())  # (4, 8, 8); a uint8 numpy array reads as 0..255
    np.testing.assert_array_equal(features, np.maximum(digits.reshape(4, 64) @ classifier.hidden_weight
                                                       + classifier.hidden_bias, 0))
    np.testing.assert_array_equal(classifier.features(images.numpy()), features)
    np.testing.assert_allclose(classifier.logits(digits),
                               features @ classifier.output_weight + classifier.output_bias, rtol=1e-12)
    assert (features == 0).any() and (features > 0).any()  # ReLU
    assert extractor.describe()["weights_file"] == "digit_classifier.json"


def test_build_feature_extractor_by_kind(inception_weights, digit_classifier_path):
    built = build_feature_extractor("inception", inception_weights=str(inception_weights),
                                    digit_classifier=None, resize="pil_bicubic", device="cpu")
    assert isinstance(built, InceptionFeatures) and built.resize == "pil_bicubic"
    built = build_feature_extractor("digits", inception_weights=None, digit_classifier=str(digit_classifier_path),
                                    resize="torch_bilinear", device="cpu")
    assert isinstance(built, DigitFeatures)
    with pytest.raises(ValueError, match=r"kind='dino'.*inception, digits"):
        build_feature_extractor("dino", inception_weights=None, digit_classifier=None,
                                resize="torch_bilinear", device="cpu")
    with pytest.raises(ValueError, match=r"eval\.inception_weights is not set"):
        build_feature_extractor("inception", inception_weights=None, digit_classifier=None,
                                resize="torch_bilinear", device="cpu")


# ----------------------------------------------------------------------------- CLIP scorer

TINY_CLIP = "ldm-test-tiny-clip"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny OpenCLIP architecture registered with open_clip, its random weights saved to a file."""
    root = tmp_path_factory.mktemp("clip")
    config = {"embed_dim": 32,
              "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}
    (root / f"{TINY_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / f"{TINY_CLIP}.json")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(TINY_CLIP)
    weights = root / "tiny_clip.pt"
    torch.save(model.state_dict(), weights)
    return weights


def test_clip_scorer_matches_the_open_clip_model_called_directly(tiny_clip):
    scorer = ClipScorer(TINY_CLIP, tiny_clip)
    images = _uint8_images(3, 40, 48, seed=5)  # not the model's 32x32: exercises resize + crop
    texts = ["a red handwritten seven", "a photo of a cat", "x"]
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP)
    model.load_state_dict(torch.load(tiny_clip, weights_only=True))
    model.eval()
    pixels = torch.stack([preprocess(Image.fromarray(i.permute(1, 2, 0).numpy())) for i in images])
    with torch.no_grad():
        expected = clip_score(model.encode_image(pixels), model.encode_text(open_clip.get_tokenizer(TINY_CLIP)(texts)))
    torch.testing.assert_close(scorer.preprocess(images), pixels, rtol=0, atol=0)
    scores = scorer.score(images, texts)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 100)).all()
    assert scorer.embed_images(images).shape == (3, 32) and scorer.embed_texts(texts).shape == (3, 32)
    info = scorer.describe()
    assert info["weights_file"] == "tiny_clip.pt" and info["preprocess"]["size"] == [32, 32]
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        scorer.score(images, texts[:2])


def test_clip_scorer_errors_name_what_to_fix(tiny_clip, tmp_path):
    missing = tmp_path / "open_clip_pytorch_model.bin"
    with pytest.raises(FileNotFoundError) as err:
        ClipScorer("ViT-L-14", missing)
    for needle in (str(missing), "'ViT-L-14'", "laion/CLIP-ViT-L-14-laion2B-s32B-b82K", "eval.clip_weights"):
        assert needle in str(err.value)
    with pytest.raises(ValueError, match=r"'ViT-L-99'.*'ViT-L-14'"):
        ClipScorer("ViT-L-99", tiny_clip)
    wrong = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), wrong)
    with pytest.raises(ValueError, match=r"linear\.pt cannot be loaded into open_clip model"):
        ClipScorer(TINY_CLIP, wrong)


# ----------------------------------------------------------------------------- reference statistics


class _TinyExtractor:
    """Deterministic and cheap: mean colour plus a fixed random projection of a 4x4 thumbnail."""

    name, dim = "tiny-test-extractor", 6

    def __init__(self):
        self.projection = np.random.default_rng(0).standard_normal((48, 3))
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        x = images.to(torch.float64) / 255.0  # (B, 3, R, R)
        thumb = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1).numpy()  # (B, 48)
        return np.concatenate([x.mean(dim=(2, 3)).numpy(), thumb @ self.projection], axis=1)

    def describe(self):
        return {"name": self.name, "dim": self.dim}


def _png(seed, size):
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def image_dir(tmp_path):
    root = tmp_path / "images"
    for i in range(12):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:03d}.png").write_bytes(_png(i, (20 + i, 16 + 2 * i)))
    return root


def test_directory_reference_is_cached_and_recomputed_when_an_image_changes(image_dir, tmp_path):
    extractor, cache = _TinyExtractor(), tmp_path / "cache"
    stats, info = reference_stats(str(image_dir), extractor, resolution=8, cache_dir=str(cache), batch_size=5)
    assert info["num_images"] == 12 and info["num_skipped"] == 0 and info["cached"] is False
    files = sorted(image_dir.rglob("*.png"), key=lambda p: p.relative_to(image_dir).as_posix())
    direct = feature_stats(extractor(torch.from_numpy(np.stack([square_rgb(p.read_bytes(), 8) for p in files]))
                                     .permute(0, 3, 1, 2)))
    np.testing.assert_allclose(stats.mu, direct.mu, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(stats.sigma, direct.sigma, rtol=1e-10, atol=1e-14)
    assert sorted(p.name for p in cache.iterdir()) == [f"{info['checksum']}.json", f"{info['checksum']}.npz"]
    assert json.loads((cache / f"{info['checksum']}.json").read_text())["extractor"] == extractor.describe()

    calls = extractor.calls
    again, info2 = reference_stats(str(image_dir), extractor, resolution=8, cache_dir=str(cache), batch_size=5)
    assert info2["cached"] is True and extractor.calls == calls and info2["checksum"] == info["checksum"]
    np.testing.assert_array_equal(again.mu, stats.mu)
    np.testing.assert_array_equal(again.sigma, stats.sigma)
    assert again.num_samples == 12

    _, other_res = reference_stats(str(image_dir), extractor, resolution=6, cache_dir=str(cache))
    assert other_res["cached"] is False and other_res["checksum"] != info["checksum"]

    files[3].write_bytes(_png(100, (20, 20)))
    changed, info3 = reference_stats(str(image_dir), extractor, resolution=8, cache_dir=str(cache))
    assert info3["cached"] is False and info3["checksum"] != info["checksum"]
    assert not np.allclose(changed.mu, stats.mu)


def test_undecodable_images_are_skipped_and_counted(image_dir):
    (image_dir / "broken.png").write_bytes(b"not a png at all")
    (image_dir / "notes.txt").write_text("ignored: not an image suffix")
    stats, info = reference_stats(str(image_dir), _TinyExtractor(), resolution=8, cache_dir=None)
    assert (info["num_images"], info["num_skipped"], info["cached"]) == (12, 1, False)
    assert stats.num_samples == 12


def test_a_source_without_readable_images_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        reference_stats(str(empty), _TinyExtractor(), resolution=8, cache_dir=None)
    (empty / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match=r"empty.*0 readable images"):
        reference_stats(str(empty), _TinyExtractor(), resolution=8, cache_dir=None)


def test_npz_reference_round_trips(tmp_path):
    rng = _rng(8)
    x = rng.standard_normal((30, 6))
    path = tmp_path / "ref_stats.npz"
    np.savez(path, mu=x.mean(0), sigma=np.cov(x, rowvar=False))
    stats, info = reference_stats(str(path), _TinyExtractor(), resolution=8, cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(stats.mu, x.mean(0))
    np.testing.assert_array_equal(stats.sigma, np.cov(x, rowvar=False))
    assert info["cached"] is False and not (tmp_path / "cache").exists()
    wrong_dim = tmp_path / "other.npz"
    np.savez(wrong_dim, mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"other\.npz have dimension 4.*gives 6"):
        reference_stats(str(wrong_dim), _TinyExtractor(), resolution=8, cache_dir=None)


def test_webdataset_shards_give_the_same_stats_as_the_same_images_in_a_directory(image_dir, tmp_path):
    files = sorted(image_dir.rglob("*.png"), key=lambda p: p.relative_to(image_dir).as_posix())
    for shard in range(2):
        with ShardWriter(tmp_path / "shards" / f"ref-{shard:06d}.tar") as writer:
            for i, path in enumerate(files[shard * 6:(shard + 1) * 6]):
                writer.write(f"{shard * 6 + i:09d}", {"png": path.read_bytes(), "txt": b"a caption"})
    # A sample without an image and one whose image is undecodable: both skipped and counted.
    with ShardWriter(tmp_path / "shards" / "ref-000002.tar") as writer:
        writer.write("000000099", {"txt": b"caption only"})
        writer.write("000000100", {"jpg": b"\xff\xd8 not a jpeg"})
    pattern = str(tmp_path / "shards" / "ref-{000000..000002}.tar")
    cache = tmp_path / "cache"
    from_dir, _ = reference_stats(str(image_dir), _TinyExtractor(), resolution=8, cache_dir=None)
    from_shards, info = reference_stats(pattern, _TinyExtractor(), resolution=8, cache_dir=str(cache), batch_size=4)
    assert (info["num_images"], info["num_skipped"], info["cached"]) == (12, 2, False)
    np.testing.assert_allclose(from_shards.mu, from_dir.mu, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(from_shards.sigma, from_dir.sigma, rtol=1e-10, atol=1e-14)
    _, info2 = reference_stats(pattern, _TinyExtractor(), resolution=8, cache_dir=str(cache))
    assert info2["cached"] is True and info2["checksum"] == info["checksum"] and info2["num_skipped"] == 2
