"""Coding-map overlays, error maps, grids and PNGs on tiny hand-made inputs."""

import numpy as np
from PIL import Image
import pytest

from dqvq import visualize


def _grey(b=1, h=32, w=32):
  return np.zeros((b, h, w, 3), np.float32)  # 0.0 -> uint8 128 (mid grey)


def test_to_uint8_maps_range_and_clips():
  x = np.array([-2.0, -1.0, 0.0, 1.0, 3.0], np.float32)
  np.testing.assert_array_equal(visualize.to_uint8(x), [0, 0, 128, 255, 255])
  assert visualize.to_uint8(x).dtype == np.uint8


def test_grain_colors_follow_official_lerp():
  two = visualize.grain_colors(2)
  np.testing.assert_array_equal(two, [[5, 39, 175], [255, 0, 0]])
  three = visualize.grain_colors(3)
  # Median grain: (blue + red) / 2 truncated, as the official triple map.
  np.testing.assert_array_equal(three[1], [130, 19, 87])


def test_overlay_colours_land_on_the_right_regions():
  images = _grey()
  gmap = np.zeros((1, 2, 2), np.int32)
  gmap[0, 0, 1] = 1  # one fine region: rows 0-15, columns 16-31
  out = visualize.coding_map_overlay(images, gmap, num_grains=2)
  assert out.shape == (1, 32, 32, 3) and out.dtype == np.uint8
  # Pixels away from grid lines: colour weight alpha = 0.7 (official blend).
  fine_px = out[0, 4, 20].astype(int)
  coarse_px = out[0, 20, 4].astype(int)
  np.testing.assert_allclose(fine_px, np.round(0.3 * 128 + 0.7 * np.array(
      [255, 0, 0])), atol=1)
  np.testing.assert_allclose(coarse_px, np.round(0.3 * 128 + 0.7 * np.array(
      [5, 39, 175])), atol=1)
  assert fine_px[0] > fine_px[2]        # reddish
  assert coarse_px[2] > coarse_px[0]    # bluish
  # Every non-line pixel of the fine region is reddish, all others bluish.
  red = out[0, ..., 0].astype(int) > out[0, ..., 2].astype(int)
  dark = out[0].max(axis=-1) == 0
  expected_red = np.zeros((32, 32), bool)
  expected_red[:16, 16:] = True
  np.testing.assert_array_equal(red[~dark], expected_red[~dark])


def test_grid_lines_mark_code_cells():
  images = _grey()
  gmap = np.zeros((1, 2, 2), np.int32)
  gmap[0, 0, 1] = 1
  out = visualize.coding_map_overlay(images, gmap, num_grains=2)
  dark = out[0].max(axis=-1) == 0
  # Region borders (top/left of every region) everywhere.
  assert dark[0, :].all() and dark[:, 0].all()
  assert dark[16, :].all() and dark[:, 16].all()
  # Inside the fine region: the mid lines of its 2x2 code cells.
  assert dark[8, 16:32].all() and dark[0:16, 24].all()
  # Inside coarse regions: no mid lines.
  assert not dark[8, 1:16].any()
  assert not dark[24, 1:16].any() and not dark[17:32, 8].any()
  assert not dark[24, 17:32].any() and not dark[17:32, 24].any()
  no_grid = visualize.coding_map_overlay(images, gmap, 2, draw_grid=False)
  assert not (no_grid[0].max(axis=-1) == 0).any()


def test_triple_grain_cells_and_factors():
  images = _grey(h=32, w=32)
  gmap = np.array([[[2]]], np.int32)  # one 32x32 region at the finest grain
  out = visualize.coding_map_overlay(images, gmap, num_grains=3)
  dark = out[0].max(axis=-1) == 0
  for edge in (0, 8, 16, 24):  # 4x4 cells of 8 pixels
    assert dark[edge, :].all() and dark[:, edge].all()
  assert not dark[4, 1:8].any()
  # Explicit factors size the cells: 32 // 16 = 2x2 cells for grain 2.
  out2 = visualize.coding_map_overlay(images, gmap, 3,
                                      grain_factors=(32, 32, 16))
  dark2 = out2[0].max(axis=-1) == 0
  assert dark2[16, :].all() and not dark2[8, 1:16].any()


def test_overlay_rejects_bad_grain_values():
  with pytest.raises(ValueError, match='grain_map values'):
    visualize.coding_map_overlay(_grey(), np.full((1, 2, 2), 2), 2)
  with pytest.raises(ValueError, match='tile'):
    visualize.coding_map_overlay(_grey(), np.zeros((1, 3, 3), int), 2)


def test_error_map_zero_is_black_and_error_is_bright():
  x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  zero = visualize.error_map(x, x)
  assert zero.shape == (2, 8, 8, 3) and zero.dtype == np.uint8
  assert not zero.any()
  y = x.copy()
  y[0, 2, 3] += 0.5
  hot = visualize.error_map(x, y)
  np.testing.assert_array_equal(hot[0, 2, 3], [255, 255, 255])  # max -> white
  assert hot[0].sum() == 255 * 3 and not hot[1].any()
  half = visualize.error_map(x, y, vmax=1.0)  # 0.5 on a 1.0 scale: red-orange
  assert half[0, 2, 3, 0] == 255 and 0 < half[0, 2, 3, 1] < 255
  block = visualize.error_map(x, y, region_size=4)
  assert (block[0, :4, :4] == block[0, 0, 0]).all() and block[0, 0, 0].any()
  assert not block[0, 4:].any()


def test_image_grid_shape_and_placement():
  imgs = np.stack([np.full((4, 5, 3), i, np.uint8) for i in range(5)])
  grid = visualize.image_grid(imgs, ncols=3, pad=2, pad_value=200)
  assert grid.shape == (2 * 4 + 2, 3 * 5 + 2 * 2, 3)
  assert (grid[0:4, 7:12] == 1).all()          # row 0, column 1
  assert (grid[6:10, 0:5] == 3).all()          # row 1, column 0
  assert (grid[6:10, 14:19] == 200).all()      # missing 6th tile is padding
  assert visualize.image_grid(imgs[:4], pad=0).shape == (8, 10, 3)  # 2x2


def test_coding_panel_layout():
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  gmap = rng.integers(0, 2, (3, 1, 1))
  panel = visualize.coding_panel(x, x, gmap, 2, pad=1)
  assert panel.shape == (3 * 16 + 2, 4 * 16 + 3, 3) and panel.dtype == np.uint8
  np.testing.assert_array_equal(panel[17:33, 0:16], visualize.to_uint8(x[1]))
  np.testing.assert_array_equal(panel[17:33, 17:33], visualize.to_uint8(x[1]))
  assert not panel[34:50, 51:67].any()  # error column of a perfect recon
  assert visualize.coding_panel(x, x, gmap, 2, max_examples=1,
                                pad=1).shape[0] == 16


def test_save_png_creates_dirs_and_roundtrips(tmp_path):
  img = np.random.default_rng(2).integers(0, 256, (6, 7, 3), dtype=np.uint8)
  path = tmp_path / 'a' / 'b' / 'panel.png'
  visualize.save_png(path, img)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), img)
  with pytest.raises(ValueError, match='uint8'):
    visualize.save_png(path, img.astype(np.float32))
