import cv2
import numpy as np

import score_plots


def test_colour_by_id_lookup():
    markers = np.array([[-1, 1, 2], [3, 3, 1]], dtype=np.int32)
    id_colours = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])

    rgb = score_plots.colour_by_id(markers, id_colours)

    assert rgb.shape == (2, 3, 3)
    assert rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [255, 255, 255]  # boundary
    assert rgb[0, 1].tolist() == [255, 255, 255]  # background
    assert rgb[0, 2].tolist() == [255, 0, 0]  # id 0
    assert rgb[1, 0].tolist() == [0, 0, 255]  # id 1


def test_colour_by_id_no_impurities():
    markers = np.ones((4, 4), dtype=np.int32)

    rgb = score_plots.colour_by_id(markers, np.zeros((0, 3)))

    assert np.all(rgb == 255)


def test_save_score_plot_writes_png(tmp_path):
    markers = np.ones((300, 400), dtype=np.int32)
    markers[100:120, 100:130] = 2
    markers[200:210, 300:305] = 3
    path = tmp_path / "plot.png"

    score_plots.save_score_plot(markers, np.array([1.0, np.nan]), path, "test plot")

    image = cv2.imread(str(path))
    assert image is not None
    assert image.shape[0] > 300
    # The score-1 impurity is drawn in dark red, jet's top colour.
    blue, green, red = image[..., 0].astype(int), image[..., 1].astype(int), image[..., 2].astype(int)
    assert np.any((red > 100) & (green < 30) & (blue < 30))


def test_large_scan_reduced_for_display():
    rgb = np.full((3000, 4000, 3), 255, dtype=np.uint8)

    reduced = score_plots._reduce_for_display(rgb)

    assert max(reduced.shape[:2]) == score_plots.PLOT_LONG_SIDE_PX
