"""Tests of shape_anomaly: circle ratio, crops, training data and scores."""

import math
import os
import re

import cv2
import numpy as np
import pytest

import shape_anomaly
from conftest import REFERENCE_SCANS
from impurity_extract import measure_impurities, significant_indices
from shape_anomaly import (
    circle_scores,
    combined_scores,
    enclosing_radius_squared,
    impurity_crops,
    prepare_training_data,
    shape_scores,
    write_crops,
)


def make_label_image(impurities, shape=(60, 60), offset=(5, 5)):
    """Build a watershed-style label image from pixel lists.

    Impurity id ``i`` is labelled ``i + 2``, the background 1 and the 1-px
    image border -1, as ``cv2.watershed`` leaves them. Each pixel list is
    shifted by ``offset``.

    Returns markers, boxes, areas and significant indices as
    ``impurity_extract`` computes them.
    """
    markers = np.ones(shape, dtype=np.int32)
    markers[0, :] = markers[-1, :] = markers[:, 0] = markers[:, -1] = -1
    for impurity_id, pixels in enumerate(impurities):
        rows, cols = np.asarray(pixels).T
        markers[rows + offset[0], cols + offset[1]] = impurity_id + 2

    boxes, areas = measure_impurities(markers, len(impurities) + 1)
    return markers, boxes, areas, significant_indices(areas)


def block(height, width, top=0, left=0):
    return [(top + r, left + c) for r in range(height) for c in range(width)]


def digital_disc(radius_squared):
    """Pixels (r, c) with r^2 + c^2 <= radius_squared, shifted to non-negative coordinates."""
    reach = math.isqrt(radius_squared)
    return [
        (r + reach, c + reach)
        for r in range(-reach, reach + 1)
        for c in range(-reach, reach + 1)
        if r * r + c * c <= radius_squared
    ]


def expected_ratio(radius_squared, area):
    return (math.pi * radius_squared - area) / (math.pi * radius_squared)


def single_score(pixels, shape=(60, 60)):
    markers, _, areas, indices = make_label_image([pixels], shape=shape)
    return circle_scores(markers, areas, indices)[0]


# ---------------------------------------------------------------------------
# Circle ratio: hand cases
# ---------------------------------------------------------------------------


def test_circle_2x2_block():
    # Pixel centres span 1 px on both axes, so r = sqrt(2) / 2 and pi r^2 = pi / 2.
    assert single_score(block(2, 2)) == pytest.approx(1 - 8 / math.pi, abs=1e-15)
    assert single_score(block(2, 2)) == pytest.approx(-1.5465, abs=1e-4)


@pytest.mark.parametrize("length", [4, 7, 30])
def test_circle_horizontal_line(length):
    radius = (length - 1) / 2
    assert single_score(block(1, length)) == pytest.approx(expected_ratio(radius**2, length), abs=1e-15)


def test_circle_vertical_line():
    assert single_score(block(9, 1)) == pytest.approx(expected_ratio(16, 9), abs=1e-15)


def test_circle_diagonal_line():
    # Centres (0, 0)..(4, 4): the diameter is 4 * sqrt(2), so r^2 = 8.
    pixels = [(i, i) for i in range(5)]
    assert single_score(pixels) == pytest.approx(expected_ratio(8, 5), abs=1e-15)


def test_circle_plus_shape():
    # Arms of 3 px: the two tips of one arm pair are a diameter, r = 3,
    # and the other two tips lie on the circle too. Area 4 * 3 + 1 = 13.
    pixels = [(3, 3)] + [(3 + d, 3) for d in (-3, -2, -1, 1, 2, 3)] + [(3, 3 + d) for d in (-3, -2, -1, 1, 2, 3)]
    assert single_score(pixels) == pytest.approx(expected_ratio(9, 13), abs=1e-15)


def test_circle_t_shape_uses_circumcircle():
    # Extreme centres (0, 0), (0, 4), (3, 2) form an acute triangle, so the
    # circle passes through all three: centre (5/6, 2), r^2 = 25/36 + 4.
    pixels = block(1, 5) + [(1, 2), (2, 2), (3, 2)]
    assert single_score(pixels) == pytest.approx(expected_ratio(25 / 36 + 4, 8), abs=1e-15)


def test_circle_right_triangle_uses_hypotenuse():
    # Filled right triangle with legs of 6 px: the hypotenuse from (6, 0)
    # to (0, 6) is the diameter, so r^2 = 72 / 4.
    pixels = [(r, c) for r in range(7) for c in range(7) if r + c <= 6]
    assert single_score(pixels) == pytest.approx(expected_ratio(18, len(pixels)), abs=1e-15)


def test_circle_digital_disc_negative():
    # 69 centres with r^2 + c^2 <= 20. (4, 2) and (-4, -2) are antipodal,
    # so r^2 = 20 and pi r^2 = 62.8 < 69: a large round impurity can score
    # below 0.
    pixels = digital_disc(20)
    assert len(pixels) == 69
    score = single_score(pixels)
    assert score == pytest.approx(expected_ratio(20, 69), abs=1e-15)
    assert score < 0


def test_circle_large_disc_many_hull_vertices():
    # A hull of more than 64 vertices takes the path that goes one first
    # vertex at a time. (150, 0) and (-150, 0) are antipodal, so r = 150.
    pixels = digital_disc(22500)
    from scipy.spatial import ConvexHull

    assert len(ConvexHull(np.asarray(pixels)).vertices) > shape_anomaly.MAX_HULL_FOR_ONE_PASS
    score = single_score(pixels, shape=(320, 320))
    assert score == pytest.approx(expected_ratio(22500, len(pixels)), abs=1e-14)


def test_enclosing_radius_single_point_and_duplicates():
    assert enclosing_radius_squared([[3, 4]]) == 0.0
    assert enclosing_radius_squared([[3, 4], [3, 4], [3, 6]]) == 1.0


def test_enclosing_radius_rejects_empty():
    with pytest.raises(ValueError, match="points"):
        enclosing_radius_squared(np.empty((0, 2)))


def test_circle_scores_inf_for_small():
    markers, _, areas, indices = make_label_image([block(2, 2), block(1, 3, top=10), block(3, 3, top=20)])
    scores = circle_scores(markers, areas, indices)
    assert scores.shape == (3,)
    assert scores.dtype == np.float64
    assert np.isinf(scores[1])
    assert np.isfinite(scores[[0, 2]]).all()


def test_circle_scores_rejects_single_pixel_id():
    markers, _, areas, _ = make_label_image([[(0, 0)], block(2, 2, top=10)])
    with pytest.raises(ValueError, match="single pixel"):
        circle_scores(markers, areas, np.array([0, 1]))


def test_circle_scores_rejects_bad_arguments():
    markers, _, areas, indices = make_label_image([block(2, 2)])
    with pytest.raises(ValueError, match="markers"):
        circle_scores(markers[0], areas, indices)
    with pytest.raises(ValueError, match="indices"):
        circle_scores(markers, areas, np.array([1]))
    with pytest.raises(ValueError, match="areas"):
        circle_scores(markers, areas.reshape(1, 1), indices)


# ---------------------------------------------------------------------------
# Circle ratio: reference values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("scan", REFERENCE_SCANS)
def test_circle_scores_match_reference(reference_dir, scan):
    reference = np.load(reference_dir / f"{scan}.npz")
    markers = np.load(reference_dir / f"{scan}_markers.npz")["markers"]
    expected = reference["circle_scores"]

    scores = circle_scores(markers, reference["areas"], reference["indices"])

    assert scores.shape == expected.shape
    assert np.array_equal(np.isinf(scores), np.isinf(expected))
    finite = np.isfinite(expected)
    assert np.abs(scores[finite] - expected[finite]).max() < 1e-12


def test_circle_scores_vertex_by_vertex_path(reference_dir, monkeypatch):
    # Force every hull through the path used for hulls of more than 64 vertices.
    monkeypatch.setattr(shape_anomaly, "MAX_HULL_FOR_ONE_PASS", 2)
    reference = np.load(reference_dir / "scan3tag-48.npz")
    markers = np.load(reference_dir / "scan3tag-48_markers.npz")["markers"]
    indices = reference["indices"]

    scores = circle_scores(markers, reference["areas"], indices)

    assert np.abs(scores[indices] - reference["circle_scores"][indices]).max() < 1e-12


# ---------------------------------------------------------------------------
# Crops
# ---------------------------------------------------------------------------


def test_crop_geometry_wide_rectangle():
    # A 4 x 9 px impurity at image rows 10..13, cols 20..28 has the padded
    # box (9, 14, 19, 29): dr = 5, dc = 10, f = min(80/5, 80/10) = 8, so
    # the window scales to 40 x 80 px and sits at row 30, column 10.
    markers, boxes, _, indices = make_label_image([block(4, 9, top=10, left=20)], offset=(0, 0))
    assert boxes[0].tolist() == [9, 14, 19, 29]

    crop_ids, crops = impurity_crops(markers, boxes, indices)

    window = np.full((5, 10), 255, np.uint8)
    window[1:, 1:] = 0
    expected = np.full((100, 100), 255, np.uint8)
    expected[30:70, 10:90] = cv2.resize(window, (80, 40))

    assert crop_ids.tolist() == [0]
    assert crops.shape == (1, 100, 100)
    assert crops.dtype == np.uint8
    assert np.array_equal(crops[0], expected)


def test_crop_geometry_tall_rectangle():
    # 19 x 3 px: dr = 20, dc = 4, f = 4, so 80 x 16 px at row 10, column 42.
    markers, boxes, _, indices = make_label_image([block(19, 3, top=10, left=20)], offset=(0, 0))
    _, crops = impurity_crops(markers, boxes, indices)

    canvas = crops[0]
    assert (canvas[:10] == 255).all()
    assert (canvas[90:] == 255).all()
    assert (canvas[:, :42] == 255).all()
    assert (canvas[:, 58:] == 255).all()
    # The window ends on the impurity, so the last scaled row and column are black.
    assert canvas[89, 50] == 0
    assert canvas[50, 57] == 0


def test_crop_neighbour_drawn_white():
    # Pixel (12, 18) inside the 10 x 10 block belongs to impurity 1, so the
    # crop of impurity 0 must show it white, unlike a fully black block.
    hole = (12, 18)
    first = [pixel for pixel in block(10, 10, top=10, left=10) if pixel != hole]
    second = [hole] + block(2, 2, top=30, left=30)
    markers, boxes, _, _ = make_label_image([first, second], offset=(0, 0))
    filled_markers = markers.copy()
    filled_markers[hole] = 2

    _, crops = impurity_crops(markers, boxes, np.array([0]))
    _, filled = impurity_crops(filled_markers, boxes, np.array([0]))

    assert crops[0].min() == 0
    assert (crops[0] >= filled[0]).all()
    assert (crops[0] > filled[0]).any()


def test_crop_scan_gray_levels():
    # The watershed gave impurity 0 a ring of pixels that are white in the
    # scan. With the scan, they stay white; without it, they are black.
    markers, boxes, _, indices = make_label_image([block(12, 12, top=10, left=10)], offset=(0, 0))
    scan = np.full(markers.shape, 255, np.uint8)
    scan[12:20, 12:20] = 0
    scan[14, 14] = 90

    _, black = impurity_crops(markers, boxes, indices)
    _, gray = impurity_crops(markers, boxes, indices, image=cv2.cvtColor(scan, cv2.COLOR_GRAY2BGR))

    window = np.where(markers[9:22, 9:22] == 2, scan[9:22, 9:22], 255).astype(np.uint8)
    expected = np.full((100, 100), 255, np.uint8)
    expected[10:90, 10:90] = cv2.resize(window, (80, 80))
    assert np.array_equal(gray[0], expected)
    assert (black[0] <= gray[0]).all()
    assert (black[0] < gray[0]).any()


def test_crop_rejects_image_shape():
    markers, boxes, _, indices = make_label_image([block(3, 3)])
    with pytest.raises(ValueError, match="image"):
        impurity_crops(markers, boxes, indices, image=np.zeros((5, 5), np.uint8))


def test_crop_skips_zero_size():
    # A 1 x 200 px line: dr = 2, dc = 201, f = 80/201, int(2 * f) = 0.
    markers, boxes, _, indices = make_label_image(
        [block(1, 200, top=5, left=2), block(5, 5, top=20, left=20)], shape=(40, 210), offset=(0, 0)
    )
    crop_ids, crops = impurity_crops(markers, boxes, indices)
    assert crop_ids.tolist() == [1]
    assert crops.shape == (1, 100, 100)


def test_crop_empty_indices():
    markers, boxes, _, _ = make_label_image([block(3, 3)])
    crop_ids, crops = impurity_crops(markers, boxes, np.array([], dtype=np.int64))
    assert crop_ids.shape == (0,)
    assert crop_ids.dtype == np.int64
    assert crops.shape == (0, 100, 100)


def test_crop_box_outside_image_drawn_white():
    # An impurity on row 0 has rmin = -1; that window row lies outside the image.
    markers = np.ones((20, 20), np.int32)
    markers[0:3, 5:8] = 2
    boxes, _ = measure_impurities(markers, 2)
    assert boxes[0, 0] == -1

    _, crops = impurity_crops(markers, boxes, np.array([0]))
    _, shifted = impurity_crops(np.pad(markers, ((1, 0), (0, 0)), constant_values=1), boxes + [1, 1, 0, 0], [0])
    assert np.array_equal(crops, shifted)


def test_crop_rejects_empty_box():
    markers, boxes, _, _ = make_label_image([block(3, 3)])
    with pytest.raises(ValueError, match="empty"):
        impurity_crops(markers, np.zeros((1, 4)), np.array([0]))
    with pytest.raises(ValueError, match="boxes"):
        impurity_crops(markers, boxes[:, :3], np.array([0]))


@pytest.mark.parametrize("scan", REFERENCE_SCANS[:1])
def test_crops_real_scan(reference_dir, scan):
    reference = np.load(reference_dir / f"{scan}.npz")
    markers = np.load(reference_dir / f"{scan}_markers.npz")["markers"]
    boxes, indices = reference["imp_boxes"], reference["indices"]

    crop_ids, crops = impurity_crops(markers, boxes, indices)

    spans = boxes[indices][:, [1, 3]] - boxes[indices][:, [0, 2]]
    factors = np.minimum(80 / spans[:, 0], 80 / spans[:, 1])
    croppable = ((spans[:, 0] * factors).astype(int) > 0) & ((spans[:, 1] * factors).astype(int) > 0)
    assert crop_ids.tolist() == indices[croppable].tolist()
    # The longer side scales to 80 px, so a 10-px margin stays white.
    assert (crops[:, :10] == 255).all()
    assert (crops[:, 90:] == 255).all()
    assert (crops.min(axis=(1, 2)) == 0).all()


def test_write_crops_round_trip(tmp_path):
    markers, boxes, _, indices = make_label_image([block(3, 5), block(6, 2, top=20)])
    crop_ids, crops = impurity_crops(markers, boxes, indices)

    paths = write_crops(crop_ids, crops, tmp_path / "crops", "scan-a")

    assert [os.path.basename(path) for path in paths] == ["scan-a_impurity_0.png", "scan-a_impurity_1.png"]
    for path, crop in zip(paths, crops):
        assert np.array_equal(cv2.imread(path, cv2.IMREAD_UNCHANGED), crop)
    assert not [name for name in os.listdir(tmp_path / "crops") if name.endswith(".tmp.png")]


def test_write_crops_rejects_bad_shape(tmp_path):
    with pytest.raises(ValueError, match="crops"):
        write_crops([0], np.zeros((1, 50, 50), np.uint8), tmp_path, "scan")


# ---------------------------------------------------------------------------
# Training data
# ---------------------------------------------------------------------------

NAME_PATTERN = re.compile(r"^(?P<ratio>-?\d+\.\d+(?:e-?\d+)?)(?P<scan>.+)_impurity_(?P<id>\d+)\.png$")


def synthetic_scan(path):
    """Write a white scan with a dark disc (round) and a dark thin cross (irregular)."""
    image = np.full((200, 200), 255, np.uint8)
    cv2.circle(image, (50, 50), 12, 0, thickness=-1)
    cv2.line(image, (110, 150), (190, 150), 0, thickness=3)
    cv2.line(image, (150, 110), (150, 190), 0, thickness=3)
    cv2.imwrite(str(path), image)


def test_prepare_training_data_classes(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    synthetic_scan(scans / "scan-x.png")
    (scans / "broken.png").write_text("not an image")

    counts = prepare_training_data([scans / "scan-x.png", scans / "broken.png"], 30, tmp_path / "rescaled")

    assert counts == {"normal": 1, "anomaly": 1}
    for class_name in ("normal", "anomaly"):
        names = os.listdir(tmp_path / "rescaled" / class_name)
        assert len(names) == 1
        match = NAME_PATTERN.match(names[0])
        assert match, names[0]
        assert match["scan"] == "scan-x"
        ratio = float(match["ratio"])
        if class_name == "normal":
            assert ratio <= 0.3
        else:
            assert ratio > 0.55


def test_prepare_training_data_name_is_ratio(tmp_path):
    synthetic_scan(tmp_path / "scan-y.png")
    prepare_training_data([tmp_path / "scan-y.png"], 30, tmp_path / "out")

    from impurity_extract import extract_impurities

    extraction = extract_impurities(tmp_path / "scan-y.png", 30)
    ratios = circle_scores(extraction.markers, extraction.areas, extraction.indices)
    for class_name in ("normal", "anomaly"):
        for name in os.listdir(tmp_path / "out" / class_name):
            match = NAME_PATTERN.match(name)
            assert match["ratio"] == str(float(ratios[int(match["id"])]))


def test_prepare_training_data_gray_levels(tmp_path):
    # The 3x3 closing fills 1-px holes, so the disc's label covers white
    # scan pixels, which stay white only in crops drawn in gray levels.
    image = np.full((200, 200), 255, np.uint8)
    cv2.circle(image, (50, 50), 12, 0, thickness=-1)
    image[44:57:4, 44:57:4] = 255
    cv2.imwrite(str(tmp_path / "scan-z.png"), image)
    prepare_training_data([tmp_path / "scan-z.png"], 30, tmp_path / "black")
    prepare_training_data([tmp_path / "scan-z.png"], 30, tmp_path / "gray", scan_gray_levels=True)

    name = os.listdir(tmp_path / "black" / "normal")[0]
    black = cv2.imread(str(tmp_path / "black" / "normal" / name), cv2.IMREAD_UNCHANGED)
    gray = cv2.imread(str(tmp_path / "gray" / "normal" / name), cv2.IMREAD_UNCHANGED)
    assert (black <= gray).all()
    assert (black < gray).any()


def test_prepare_training_data_rejects_bad_ratios(tmp_path):
    with pytest.raises(ValueError, match="normal_max_ratio"):
        prepare_training_data([], 30, tmp_path, normal_max_ratio=0.6, anomaly_min_ratio=0.5)
    with pytest.raises(ValueError, match="min_area"):
        prepare_training_data([], 30, tmp_path, min_area=float("nan"))


def test_prepare_training_data_real_scan(scans_dir, reference_dir, tmp_path):
    scan = "scan3tag-48"
    reference = np.load(reference_dir / f"{scan}.npz")
    ratios, areas = reference["circle_scores"], reference["areas"]
    large = np.isfinite(ratios) & (areas > 50)

    counts = prepare_training_data([scans_dir / f"{scan}.png"], 30, tmp_path)

    # No impurity above 50 px^2 is more than 80 times longer than wide
    # here, so every one of them is cropped.
    assert counts["normal"] == int(np.sum(large & (ratios <= 0.3)))
    assert counts["anomaly"] == int(np.sum(large & (ratios > 0.55)))
    assert len(os.listdir(tmp_path / "normal")) == counts["normal"]


# ---------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------


def test_shape_scores_min_max():
    scores = shape_scores([4, 1, 2], [3.0, 1.0, 2.0], 6)
    assert scores.tolist() == [0.0, 0.0, 0.5, 0.0, 1.0, 0.0]


def test_shape_scores_ignores_unusable_losses():
    scores = shape_scores([0, 1, 2, 3, 4], [np.nan, 0.0, -1.0, 2.0, 4.0], 5)
    assert scores.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_shape_scores_constant_is_zero():
    scores = shape_scores([0, 1, 2], [5.0, 5.0, 5.0], 4)
    assert scores.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_shape_scores_empty():
    assert shape_scores(np.array([], np.int64), np.array([]), 3).tolist() == [0.0, 0.0, 0.0]


def test_shape_scores_rejects_bad_arguments():
    with pytest.raises(ValueError, match="crop_ids"):
        shape_scores([0, 5], [1.0, 2.0], 3)
    with pytest.raises(ValueError, match="crop_ids"):
        shape_scores([1, 1], [1.0, 2.0], 3)
    with pytest.raises(ValueError, match="losses"):
        shape_scores([0, 1], [1.0], 3)
    with pytest.raises(ValueError, match="n must"):
        shape_scores([0], [1.0], -1)


def test_combined_scores_product_normalised():
    combined = combined_scores([1.0, 0.5, 0.2, 0.0], [0.5, 1.0, 0.5, 1.0])
    assert combined == pytest.approx([1.0, 1.0, 0.2, 0.0])


def test_combined_scores_constant_is_zero():
    combined = combined_scores([0.3, 0.3], [0.0, 0.0])
    assert combined.tolist() == [0.0, 0.0]
    assert combined_scores([0.5, 0.5], [1.0, 1.0]).tolist() == [0.0, 0.0]


def test_combined_scores_never_nan():
    rng = np.random.default_rng(3)
    spatial = rng.random(500) * (rng.random(500) > 0.5)
    shape = rng.random(500) * (rng.random(500) > 0.5)
    combined = combined_scores(spatial, shape)
    assert not np.isnan(combined).any()
    assert combined.min() == 0.0
    assert combined.max() == 1.0


def test_combined_scores_rejects_nan():
    with pytest.raises(ValueError, match="spatial"):
        combined_scores([np.nan, 0.5], [1.0, 1.0])
    with pytest.raises(ValueError, match="shape"):
        combined_scores([0.5, 0.5], [1.0])
