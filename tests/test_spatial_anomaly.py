import logging
import math

import numpy as np
import pytest

from conftest import REFERENCE_SCANS
from spatial_anomaly import (
    _kth_weighted_distances,
    box_distance,
    box_distances,
    weighted_kth_nn,
)

# Box layout is (rmin, rmax, cmin, cmax) in px.
CENTRE = (10, 20, 10, 20)


@pytest.mark.parametrize(
    "other, expected",
    [
        ((12, 18, 12, 18), 0.0),  # inside
        ((15, 25, 15, 25), 0.0),  # overlapping
        ((20, 30, 10, 20), 0.0),  # sharing the edge row 20
        ((10, 20, 0, 4), 6.0),  # left: 10 - 4
        ((10, 20, 27, 30), 7.0),  # right: 27 - 20
        ((0, 7, 12, 14), 3.0),  # above: 10 - 7
        ((25, 30, 0, 30), 5.0),  # below and spanning all columns: 25 - 20
        ((0, 7, 0, 6), 5.0),  # above left: corners (10, 10) and (7, 6), 3-4-5
        ((0, 4, 28, 40), 10.0),  # above right: corners (10, 20) and (4, 28), 6-8-10
        ((25, 30, 0, 5), math.hypot(5, 5)),  # below left
        ((32, 40, 25, 40), 13.0),  # below right: 12 and 5
    ],
)
def test_box_distance_each_position(other, expected):
    assert box_distance(CENTRE, other) == pytest.approx(expected, abs=1e-12)
    assert box_distance(other, CENTRE) == pytest.approx(expected, abs=1e-12)


def test_box_distances_matrix_shape():
    boxes_a = np.array([CENTRE, (0, 7, 0, 6)], dtype=float)
    boxes_b = np.array([CENTRE, (0, 7, 0, 6), (10, 20, 27, 30)], dtype=float)

    distances = box_distances(boxes_a, boxes_b)

    assert distances.shape == (2, 3)
    assert distances[0, 0] == 0.0
    assert distances[1, 1] == 0.0
    assert distances[0, 2] == 7.0
    assert distances[1, 2] == pytest.approx(math.hypot(3, 21))


def _three_impurities():
    # Impurity 1 lies 3 px right of 0, impurity 2 lies 8 px below 0.
    boxes = np.array([(0, 2, 0, 2), (0, 2, 5, 7), (10, 12, 0, 2)], dtype=float)
    areas = np.array([4.0, 8.0, 4.0])
    return boxes, areas


def test_kth_weighted_distance_by_hand():
    boxes, areas = _three_impurities()

    kth = _kth_weighted_distances(boxes, areas, 1)

    # Impurity 0: w01 = (4/8)^4 * 3 = 0.1875, w02 = 1 * 8.
    # Impurity 1: w10 = 2^4 * 3 = 48, w12 = 2^4 * sqrt(8^2 + 3^2).
    # Impurity 2: w20 = 8, w21 = (1/2)^4 * sqrt(73).
    assert kth[0] == pytest.approx(0.1875)
    assert kth[1] == pytest.approx(48.0)
    assert kth[2] == pytest.approx(math.sqrt(73) / 16)

    second = _kth_weighted_distances(boxes, areas, 2)
    assert second[0] == pytest.approx(8.0)
    assert second[1] == pytest.approx(16 * math.sqrt(73))
    assert second[2] == pytest.approx(8.0)


def test_three_impurity_score_by_hand():
    boxes, areas = _three_impurities()

    score = weighted_kth_nn(boxes, areas, [0, 1, 2], [1])[1]

    # Raw scores A * w^2: 4 * 0.1875^2 = 0.140625, 8 * 48^2 = 18432, and
    # 4 * 73 / 256 = 1.140625. After the log and min-max they are 0, 1 and
    # ln(1.140625/0.140625)/ln(18432/0.140625) = 0.1776. The population
    # standard deviation of (0, 1, 0.1776) is 0.4356, so subtracting twice
    # it leaves only impurity 1 above the 1e-5 floor.
    assert score[1] == 1.0
    assert score[0] == 0.0
    assert score[2] == 0.0


def test_rescale_keeps_middle_values():
    # Eleven impurities in a row with growing gaps give graded scores.
    gaps = np.arange(1, 12, dtype=float) ** 2
    starts = np.concatenate([[0.0], np.cumsum(gaps[:-1] + 2)])
    boxes = np.stack([np.zeros(11), np.full(11, 2.0), starts, starts + 2], axis=1)
    areas = np.full(11, 4.0)

    score = weighted_kth_nn(boxes, areas, np.arange(11), [1])[1]

    assert score.max() == 1.0
    assert score.min() == 0.0
    assert np.all(np.isfinite(score))
    assert np.count_nonzero((score > 0) & (score < 1)) >= 1


def test_non_significant_ids_score_zero():
    boxes, areas = _three_impurities()
    boxes = np.vstack([boxes, (50, 52, 50, 52)])
    areas = np.append(areas, 2.0)

    score = weighted_kth_nn(boxes, areas, [0, 1, 2], [1])[1]

    assert score.shape == (4,)
    assert score[3] == 0.0


def test_fewer_impurities_than_k_clamps(caplog):
    boxes, areas = _three_impurities()

    with caplog.at_level(logging.WARNING):
        clamped = weighted_kth_nn(boxes, areas, [0, 1, 2], [50])[50]
    exact = weighted_kth_nn(boxes, areas, [0, 1, 2], [2])[2]

    np.testing.assert_array_equal(clamped, exact)
    assert "k=50" in caplog.text
    assert "k=2" in caplog.text


def test_exactly_k_plus_one_impurities_no_clamp(caplog):
    boxes, areas = _three_impurities()

    with caplog.at_level(logging.WARNING):
        score = weighted_kth_nn(boxes, areas, [0, 1, 2], [2])[2]

    assert "requested" not in caplog.text
    assert np.all(np.isfinite(score))


@pytest.mark.parametrize("count", [0, 1])
def test_zero_or_one_impurity_scores_zero(count):
    boxes = np.array([(0, 2, 0, 2)] * count, dtype=float).reshape(count, 4)
    areas = np.full(count, 4.0)

    scores = weighted_kth_nn(boxes, areas, np.arange(count), [1, 50])

    for k in (1, 50):
        assert scores[k].shape == (count,)
        assert np.all(scores[k] == 0)


def test_identical_boxes_no_nan():
    boxes = np.array([(0, 4, 0, 4), (0, 4, 0, 4), (40, 44, 40, 44)], dtype=float)
    areas = np.array([9.0, 9.0, 9.0])

    score = weighted_kth_nn(boxes, areas, [0, 1, 2], [1])[1]

    assert np.all(np.isfinite(score))
    assert score[2] == 1.0


def test_constant_raw_scores_all_zero():
    # Four equal impurities on the corners of a square: every raw score is equal.
    boxes = np.array([(0, 2, 0, 2), (0, 2, 10, 12), (10, 12, 0, 2), (10, 12, 10, 12)], dtype=float)
    areas = np.full(4, 4.0)

    score = weighted_kth_nn(boxes, areas, np.arange(4), [1])[1]

    np.testing.assert_array_equal(score, np.zeros(4))


def test_several_k_match_single_k():
    rng = np.random.default_rng(3)
    corners = rng.integers(0, 500, size=(60, 2)).astype(float)
    sizes = rng.integers(2, 12, size=(60, 2)).astype(float)
    boxes = np.column_stack([corners[:, 0], corners[:, 0] + sizes[:, 0], corners[:, 1], corners[:, 1] + sizes[:, 1]])
    areas = sizes.prod(axis=1)
    indices = np.arange(60)

    together = weighted_kth_nn(boxes, areas, indices, [3, 10])

    np.testing.assert_array_equal(together[3], weighted_kth_nn(boxes, areas, indices, [3])[3])
    np.testing.assert_array_equal(together[10], weighted_kth_nn(boxes, areas, indices, 10)[10])


def test_chunking_matches_direct(monkeypatch):
    import spatial_anomaly

    rng = np.random.default_rng(5)
    corners = rng.integers(0, 800, size=(300, 2)).astype(float)
    boxes = np.column_stack([corners[:, 0], corners[:, 0] + 4, corners[:, 1], corners[:, 1] + 6])
    areas = rng.integers(4, 40, size=300).astype(float)

    whole = weighted_kth_nn(boxes, areas, np.arange(300), [7])[7]
    monkeypatch.setattr(spatial_anomaly, "CHUNK_ROWS", 64)
    chunked = weighted_kth_nn(boxes, areas, np.arange(300), [7])[7]

    np.testing.assert_array_equal(whole, chunked)


@pytest.mark.parametrize("bad_k", [0, -3, 2.5, True])
def test_invalid_k_rejected(bad_k):
    boxes, areas = _three_impurities()
    with pytest.raises(ValueError, match="k"):
        weighted_kth_nn(boxes, areas, [0, 1, 2], [bad_k])


def test_mismatched_areas_rejected():
    boxes, areas = _three_impurities()
    with pytest.raises(ValueError, match="areas"):
        weighted_kth_nn(boxes, areas[:2], [0, 1], [1])


def test_out_of_range_indices_rejected():
    boxes, areas = _three_impurities()
    with pytest.raises(ValueError, match="indices"):
        weighted_kth_nn(boxes, areas, [0, 5], [1])


@pytest.mark.parametrize("scan", REFERENCE_SCANS)
def test_spatial_k50_matches_reference(reference_dir, scan):
    reference = np.load(reference_dir / f"{scan}.npz")

    score = weighted_kth_nn(reference["imp_boxes"], reference["areas"], reference["indices"], [50])[50]

    np.testing.assert_allclose(score, reference["spatial_k50"], rtol=0, atol=1e-12)
