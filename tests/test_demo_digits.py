import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from sklearn.datasets import load_digits

from data_pipeline import demo_digits
from data_pipeline.demo_digits import (
    DIGIT_NAMES,
    PALETTE,
    DemoDigitsConfig,
    DigitClassifier,
    build_digits_shards,
    read_digits_manifest,
    render_digit,
    to_classifier_input,
)

NUM_DIGITS = 1797  # sklearn.datasets.load_digits


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return build_digits_shards(out, image_size=32, samples_per_shard=256, seed=0, val_fraction=0.1)


@pytest.fixture(scope="module")
def val_rows(built):
    """The val shard read back the way training reads shards: webdataset, PNG decoded to float RGB."""
    rows = list(wds.WebDataset(built.val_url, shardshuffle=False).decode("rgb"))
    assert len(rows) == built.num_val
    return rows


def _tar_members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_manifest_counts_match_the_shards(built):
    manifest = json.loads(built.manifest_path.read_text())
    assert built.num_train + built.num_val == NUM_DIGITS
    assert built.num_val == round(0.1 * NUM_DIGITS) - 1  # stratified: round(10%) of each digit
    assert built.train_shards == tuple(f"train-{i:06d}.tar" for i in range(7))
    assert built.val_shards == ("val-000000.tar",)
    assert manifest["train"]["samples_per_shard"] == [256] * 6 + [built.num_train - 6 * 256]
    assert (manifest["image_size"], manifest["seed"], manifest["source"]) == (32, 0, "sklearn.load_digits")
    for split in ("train", "val"):
        sizes = manifest[split]["samples_per_shard"]
        assert sum(sizes) == manifest[split]["num_samples"]
        for name, size in zip(manifest[split]["shards"], sizes):
            names = _tar_members(built.out_dir / name)
            assert len(names) == 3 * size
            assert {Path(n).suffix for n in names} == {".png", ".txt", ".json"}
    assert sorted(p.name for p in built.out_dir.iterdir()) == sorted(
        [*built.train_shards, *built.val_shards, "digit_classifier.json", "manifest.json"])
    assert read_digits_manifest(built.out_dir) == built


def test_every_sample_is_keyed_like_img2dataset_and_unique(built):
    keys = []
    for name in built.train_shards + built.val_shards:
        keys += sorted({n.split(".")[0] for n in _tar_members(built.out_dir / name)})
    assert len(keys) == len(set(keys)) == NUM_DIGITS
    assert all(len(k) == 9 and k.isdigit() for k in keys)
    assert keys[:2] == ["000000000", "000000001"]


def test_val_split_is_stratified_and_disjoint_from_train(built, val_rows):
    val_sources = {r["json"]["source_index"] for r in val_rows}
    train_sources = set()
    for row in wds.WebDataset(built.train_url, shardshuffle=False):
        train_sources.add(json.loads(row["json"])["source_index"])
    assert not val_sources & train_sources
    assert len(val_sources | train_sources) == NUM_DIGITS
    per_digit = np.bincount([r["json"]["digit"] for r in val_rows], minlength=10)
    assert per_digit.min() >= 17 and per_digit.max() <= 19


def test_samples_read_back_through_webdataset_are_consistent(val_rows):
    colour_matches = white_corners = 0
    for row in val_rows:
        meta, caption, image = row["json"], row["txt"], row["png"]  # image: (H, W, 3) float in [0, 1]
        assert meta["key"] == row["__key__"]
        assert caption == meta["caption"] == (f"a {meta['color']} handwritten "
                                              f"{DIGIT_NAMES[meta['digit']]} on a white background")
        assert image.shape == (meta["height"], meta["width"], 3) == (32, 32, 3)
        assert (meta["original_width"], meta["original_height"]) == (8, 8)
        assert meta["source"] == "sklearn.load_digits" and meta["color"] in PALETTE
        # Only white and the named colour: every pixel lies on the segment between them.
        colour = np.asarray(PALETTE[meta["color"]]) / 255
        ink = 1.0 - image.min(axis=-1)  # (H, W)
        blend = 1.0 - ink[..., None] * (1.0 - colour)
        assert np.abs(image - blend).max() <= 1.5 / 255
        white_corners += ink[0, 0] <= 2 / 255
        # The most inked pixel carries the full stroke colour.
        darkest = image[np.unravel_index(ink.argmax(), ink.shape)] * 255
        colour_matches += np.abs(darkest - np.asarray(PALETTE[meta["color"]])).max() <= 8
    assert colour_matches / len(val_rows) >= 0.95
    assert white_corners / len(val_rows) >= 0.95  # bicubic ringing may tint a corner by 1/255


def test_classifier_recognises_the_digit_named_in_each_caption(built, val_rows):
    classifier = DigitClassifier.load(built.classifier_path)
    images = np.stack([r["png"] for r in val_rows])  # (V, 32, 32, 3), decoded from PNG
    named = np.array([DIGIT_NAMES.index(r["txt"].split()[3]) for r in val_rows])
    accuracy = float((classifier.predict(images) == named).mean())
    assert accuracy >= 0.90
    assert accuracy == pytest.approx(built.classifier_accuracy_val_rendered)


def test_classifier_accuracy_on_the_raw_sklearn_val_split(built, val_rows):
    classifier = DigitClassifier.load(built.classifier_path)
    digits = load_digits()
    sources = np.array([r["json"]["source_index"] for r in val_rows])
    accuracy = float((classifier.predict_digits(digits.images[sources]) == digits.target[sources]).mean())
    assert accuracy >= 0.90
    assert accuracy == pytest.approx(built.classifier_accuracy_val_digits)


def test_predict_accepts_layouts_ranges_and_sizes(built, val_rows):
    classifier = DigitClassifier.load(built.classifier_path)
    hwc = np.stack([r["png"] for r in val_rows])  # (V, 32, 32, 3) in [0, 1]
    expected = classifier.predict(hwc)
    chw_signed = torch.from_numpy(hwc).permute(0, 3, 1, 2) * 2 - 1  # (V, 3, 32, 32) in [-1, 1]
    np.testing.assert_array_equal(classifier.predict(chw_signed, value_range=(-1, 1)), expected)
    uint8 = np.round(hwc * 255).astype(np.uint8)
    np.testing.assert_array_equal(classifier.predict(uint8), expected)
    # A uint8 tensor reads as 0..255 like a uint8 array (it used to be cast to float first: 0..1).
    np.testing.assert_array_equal(classifier.predict(torch.from_numpy(uint8).permute(0, 3, 1, 2)), expected)
    np.testing.assert_array_equal(classifier.features(torch.from_numpy(uint8)), classifier.features(uint8))
    np.testing.assert_array_equal(classifier.predict(hwc[0]), expected[:1])
    digits = np.array([r["json"]["digit"] for r in val_rows])
    for size in (28, 64):  # 28 is not a multiple of 8: fractional area weights
        resized = np.stack([np.asarray(Image.fromarray(u).resize((size, size), Image.Resampling.BICUBIC))
                            for u in uint8])
        assert (classifier.predict(resized) == digits).mean() >= 0.90
    with pytest.raises(ValueError, match="value_range"):
        classifier.predict(hwc, value_range=(1, 1))
    with pytest.raises(ValueError, match=r"shape \(4, 32, 32, 5\)"):
        classifier.predict(np.zeros((4, 32, 32, 5)))


def test_classifier_input_inverts_the_rendering():
    digits = load_digits()
    rendered = np.stack([render_digit(digits.images[i], color, 32)
                         for i, color in zip(range(70), list(PALETTE) * 10)])
    back = to_classifier_input(rendered)  # (70, 8, 8) in 0..16
    assert back.shape == (70, 8, 8)
    assert back.min() == 0.0 and back.max() == 16.0
    assert np.abs(back - digits.images[:70]).mean() < 1.0
    # every palette colour maps to the same ink: the mapping ignores the colour
    one = [to_classifier_input(render_digit(digits.images[5], c, 32)) for c in PALETTE]
    for other in one[1:]:
        np.testing.assert_allclose(other, one[0], atol=16 / 255 * 2)


def test_classifier_file_is_json_and_round_trips(built, tmp_path):
    payload = json.loads(built.classifier_path.read_text())
    assert payload["format"] == "ldm-platform/digit-classifier"
    classifier = DigitClassifier.load(built.classifier_path)
    classifier.save(tmp_path / "copy.json")
    assert (tmp_path / "copy.json").read_bytes() == built.classifier_path.read_bytes()
    with pytest.raises(FileNotFoundError, match="missing.json"):
        DigitClassifier.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({**payload, "version": 99}))
    with pytest.raises(ValueError, match="version=99"):
        DigitClassifier.load(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({**payload, "output_bias": [0.0] * 9}))
    with pytest.raises(ValueError, match=r"output_bias has shape \(9,\)"):
        DigitClassifier.load(tmp_path / "bad.json")


def test_rebuild_is_byte_identical(built, tmp_path):
    again = build_digits_shards(tmp_path, image_size=32, samples_per_shard=256, seed=0, val_fraction=0.1)
    names = sorted(p.name for p in built.out_dir.iterdir())
    assert names == sorted(p.name for p in again.out_dir.iterdir())
    for name in names:
        assert (built.out_dir / name).read_bytes() == (again.out_dir / name).read_bytes(), name


def test_rebuild_into_the_same_directory_replaces_stale_shards_and_leaves_no_temp_files(tmp_path):
    first = build_digits_shards(tmp_path, image_size=8, samples_per_shard=500, seed=1)
    assert len(first.train_shards) == 4
    second = build_digits_shards(tmp_path, image_size=8, samples_per_shard=2000, seed=1)
    assert second.train_shards == ("train-000000.tar",)
    assert sorted(os.listdir(tmp_path)) == ["digit_classifier.json", "manifest.json",
                                            "train-000000.tar", "val-000000.tar"]
    assert second.train_url == str(tmp_path / "train-000000.tar")
    assert len(list(wds.WebDataset(second.train_url, shardshuffle=False))) == second.num_train
    # mkstemp's 0600 is not what a dataset file should carry
    assert (tmp_path / "manifest.json").stat().st_mode & 0o644 == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    target.write_bytes(b"old")

    def failing_replace(src, dst):
        raise OSError("disk full")

    from trainer import images  # the dataset build writes every file through it

    monkeypatch.setattr(images.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        images.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_tar_members_have_fixed_metadata(built):
    with tarfile.open(built.out_dir / built.val_shards[0]) as tar:
        info = tar.getmembers()[0]
        assert (info.mtime, info.uid, info.gid, info.uname, info.gname) == (0, 0, 0, "", "")
        png = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".png"))).read()
    assert Image.open(io.BytesIO(png)).mode == "RGB"


@pytest.mark.parametrize("kwargs, match", [
    ({"image_size": 4}, r"image_size=4 must be an integer in \[8, 1024\]"),
    ({"samples_per_shard": 0}, r"samples_per_shard=0 must be a positive integer"),
    ({"val_fraction": 0.0}, r"val_fraction=0.0 must be in \(0, 0.5\)"),
    ({"val_fraction": 0.7}, r"val_fraction=0.7"),
    ({"seed": -1}, r"seed=-1 must be a non-negative integer"),
])
def test_bad_settings_fail_before_any_work(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        DemoDigitsConfig(**kwargs)
    with pytest.raises(ValueError, match=match):
        build_digits_shards(tmp_path / "never", **kwargs)
    assert not (tmp_path / "never").exists()
