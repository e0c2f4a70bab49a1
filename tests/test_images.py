import numpy as np
import pytest
import torch
from PIL import Image

from trainer import images as images_mod
from trainer.images import make_grid, save_png, tile_uint8, to_uint8


def test_to_uint8_maps_value_range_and_clamps():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = to_uint8(x)
    assert out.shape == (1, 1, 6, 3) and out.dtype == np.uint8
    # 0 -> 127.5 rounds half-to-even to 128; 0.5 -> 191.25 -> 191.
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    out01 = to_uint8(torch.tensor([0.0, 0.2, 1.0]).view(1, 1, 1, 3), value_range=(0, 1))
    assert out01.shape == (1, 1, 3, 3)  # grayscale expanded to RGB
    assert out01[0, 0, :, 0].tolist() == [0, 51, 255]


def test_to_uint8_keeps_channel_order():
    x = torch.full((2, 3, 2, 2), -1.0)
    x[:, 0] = 1.0  # red channel only
    out = to_uint8(x)
    assert (out[..., 0] == 255).all() and (out[..., 1:] == 0).all()


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(3, 4, 4), "images.shape"),
    (torch.zeros(1, 2, 4, 4), "images.shape"),
])
def test_to_uint8_rejects_bad_shapes(bad, match):
    with pytest.raises(ValueError, match=match):
        to_uint8(bad)


def test_to_uint8_rejects_empty_range():
    with pytest.raises(ValueError, match="value_range"):
        to_uint8(torch.zeros(1, 3, 2, 2), value_range=(1, 1))


def test_grid_shape_padding_and_placement():
    num, height, width = 5, 4, 6
    colors = torch.linspace(-0.8, 0.8, num)
    x = colors.view(num, 1, 1, 1).expand(num, 3, height, width).clone()
    expected_colors = to_uint8(x)[:, 0, 0, 0]
    grid = make_grid(x)  # nrow = ceil(sqrt(5)) = 3 -> 2 rows
    assert grid.shape == (2 * (height + 2) + 2, 3 * (width + 2) + 2, 3)
    mask = np.zeros(grid.shape[:2], bool)
    for i in range(num):
        row, col = divmod(i, 3)
        top, left = 2 + row * (height + 2), 2 + col * (width + 2)
        assert (grid[top:top + height, left:left + width] == expected_colors[i]).all()
        mask[top:top + height, left:left + width] = True
    assert (grid[~mask] == 0).all()  # padding and the empty sixth cell are black
    assert make_grid(x, nrow=5).shape == (height + 4, 5 * (width + 2) + 2, 3)
    assert make_grid(x, nrow=3, padding=0).shape == (2 * height, 3 * width, 3)
    assert make_grid(x, nrow=8).shape == (height + 4, 5 * (width + 2) + 2, 3)  # nrow capped at N


def test_grid_matches_torchvision_layout():
    torchvision_utils = pytest.importorskip("torchvision.utils")
    torch.manual_seed(0)
    x = torch.rand(7, 3, 5, 3) * 2 - 1
    batch = to_uint8(x)
    for nrow, padding in ((3, 2), (2, 1), (7, 0)):
        ours = tile_uint8(batch, nrow=nrow, padding=padding)
        theirs = torchvision_utils.make_grid(torch.from_numpy(batch).permute(0, 3, 1, 2), nrow=nrow,
                                             padding=padding, pad_value=0)
        np.testing.assert_array_equal(ours, theirs.permute(1, 2, 0).numpy())


def test_grid_rejects_bad_nrow_and_empty_batch():
    with pytest.raises(ValueError, match="nrow"):
        make_grid(torch.zeros(2, 3, 2, 2), nrow=0)
    with pytest.raises(ValueError, match="empty"):
        make_grid(torch.zeros(0, 3, 2, 2))


def test_save_png_roundtrip_is_atomic(tmp_path):
    torch.manual_seed(0)
    grid = make_grid(torch.rand(4, 3, 8, 8) * 2 - 1)
    path = tmp_path / "a" / "b" / "grid.png"
    assert save_png(grid, path) == path
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), grid)
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]


def test_save_png_failure_keeps_old_file_and_leaves_no_tmp(tmp_path, monkeypatch):
    path = tmp_path / "grid.png"
    old = np.full((4, 4, 3), 7, np.uint8)
    save_png(old, path)

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(images_mod.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_png(np.zeros((4, 4, 3), np.uint8), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(path)), old)


def test_save_png_rejects_non_uint8_hwc(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        save_png(np.zeros((4, 4, 3), np.float32), tmp_path / "x.png")
    with pytest.raises(ValueError, match="uint8"):
        save_png(np.zeros((3, 4, 4), np.uint8), tmp_path / "x.png")
