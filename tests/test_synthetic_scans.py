"""Tests of the synthetic scan generator, its truth and the shipped examples."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import synthetic_scans
from impurity_extract import extract_from_image
from spatial_anomaly import weighted_kth_nn
from synthetic_scans import (
    CROSS,
    DENSE_PATCH_MEMBER,
    ELONGATED,
    LARGE_ISOLATED,
    generate_from_truth,
    generate_scan,
    match_truth,
    write_examples,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO_ROOT / "examples"
MIN_THRESHOLD = 30
K = 50

#: Seeds of the extraction checks. Seeds 1 to 3 also make the shipped examples.
CHECKED_SEEDS = [1, 2, 3]

#: Largest accepted size of one shipped example PNG, in bytes.
MAX_EXAMPLE_BYTES = 400_000


def _enclosing_circle_ratio(extraction, impurity_id):
    """Return (pi r^2 - A) / (pi r^2) for the minimal enclosing circle of the pixel centres."""
    # The padded box contains every pixel of the impurity, so cropping to it
    # avoids scanning the whole label image once per impurity.
    row_min, row_max, col_min, col_max = extraction.boxes[impurity_id].astype(int)
    window = extraction.markers[max(row_min, 0) : row_max + 1, max(col_min, 0) : col_max + 1]
    pixels = np.argwhere(window == impurity_id + 2).astype(np.float32)
    _, radius = cv2.minEnclosingCircle(pixels)
    circle_area = np.pi * radius * radius
    return (circle_area - len(pixels)) / circle_area


def _shipped_truth_paths():
    return sorted(EXAMPLES_DIR.glob("synthetic_*_truth.json"), key=lambda path: int(path.name.split("_")[1]))


@pytest.fixture(scope="module", params=CHECKED_SEEDS, ids=lambda seed: f"seed{seed}")
def scan(request):
    """Generated scan, its truth, its extraction at threshold 30 and its k=50 scores."""
    image, truth = generate_scan(request.param)
    extraction = extract_from_image(image, MIN_THRESHOLD)
    scores = weighted_kth_nn(extraction.boxes, extraction.areas, extraction.indices, [K])[K]
    return image, truth, extraction, scores


def _ids_of_kind(truth, ids, kinds):
    return [int(i) for anomaly, i in zip(truth["anomalies"], ids) if anomaly["kind"] in kinds]


# Determinism


def test_generate_scan_same_seed_same_output():
    image_a, truth_a = generate_scan(11, height=500, width=600)
    image_b, truth_b = generate_scan(11, height=500, width=600)

    np.testing.assert_array_equal(image_a, image_b)
    assert truth_a == truth_b


def test_generate_scan_different_seed_differs():
    image_a, _ = generate_scan(11, height=500, width=600)
    image_b, _ = generate_scan(12, height=500, width=600)

    assert image_a.shape == image_b.shape
    assert not np.array_equal(image_a, image_b)


def test_generate_from_truth_roundtrip():
    image, truth = generate_scan(4, height=500, width=600, dot_count=100, cross_count=3)
    json_truth = json.loads(json.dumps(truth))

    again, again_truth = generate_from_truth(json_truth)

    np.testing.assert_array_equal(image, again)
    assert again_truth == json_truth


# Image and truth content


def test_image_gray_levels(scan):
    image, truth, _, _ = scan

    assert image.dtype == np.uint8
    assert image.shape == (truth["height"], truth["width"])
    dark = image <= synthetic_scans.IMPURITY_MAX_GRAY
    assert dark.any()
    assert np.all(image[~dark] >= synthetic_scans.BACKGROUND_MIN_GRAY)


def test_truth_lists_requested_anomalies(scan):
    _, truth, _, _ = scan
    kinds = [anomaly["kind"] for anomaly in truth["anomalies"]]
    parameters = truth["parameters"]

    assert kinds.count(LARGE_ISOLATED) == parameters["large_count"]
    assert kinds.count(ELONGATED) == parameters["elongated_count"]
    assert kinds.count(CROSS) == parameters["cross_count"]
    assert kinds.count(DENSE_PATCH_MEMBER) == parameters["patch_member_count"]
    assert truth["placed_dot_count"] == parameters["dot_count"]
    assert truth["impurity_count"] == truth["placed_dot_count"] + len(kinds)


def test_truth_centres_inside_boxes(scan):
    image, truth, _, _ = scan

    for anomaly in truth["anomalies"]:
        row, col = anomaly["centre"]
        row_min, row_max, col_min, col_max = anomaly["box"]
        assert row_min <= row <= row_max, anomaly
        assert col_min <= col <= col_max, anomaly
        assert image[row, col] <= synthetic_scans.IMPURITY_MAX_GRAY, anomaly


def test_dense_patch_box_contains_members(scan):
    _, truth, _, _ = scan
    patch_min_row, patch_max_row, patch_min_col, patch_max_col = truth["dense_patch"]["box"]

    for anomaly in truth["anomalies"]:
        if anomaly["kind"] != DENSE_PATCH_MEMBER:
            continue
        row_min, row_max, col_min, col_max = anomaly["box"]
        assert patch_min_row <= row_min, anomaly
        assert row_max <= patch_max_row, anomaly
        assert patch_min_col <= col_min, anomaly
        assert col_max <= patch_max_col, anomaly


def test_no_dense_patch_when_no_members():
    _, truth = generate_scan(3, height=500, width=600, patch_member_count=0)

    assert "dense_patch" not in truth
    assert all(anomaly["kind"] != DENSE_PATCH_MEMBER for anomaly in truth["anomalies"])


def test_small_scan_places_fewer_dots(caplog):
    _, truth = generate_scan(0, height=400, width=400)

    assert truth["placed_dot_count"] < truth["parameters"]["dot_count"]
    assert "placed" in caplog.text


# Extraction at threshold 30


def test_watershed_separates_every_impurity(scan):
    _, truth, extraction, _ = scan

    assert extraction.n_impurities == truth["impurity_count"]
    assert len(extraction.indices) == truth["impurity_count"]


def test_match_truth_finds_significant_ids(scan):
    _, truth, extraction, _ = scan

    ids = match_truth(truth, extraction)

    assert ids.shape == (len(truth["anomalies"]),)
    assert np.all(ids >= 0)
    assert len(set(ids.tolist())) == len(ids)
    assert np.all(extraction.areas[ids] > 3)
    assert np.all(np.isin(ids, extraction.indices))


def test_match_truth_boxes_agree(scan):
    _, truth, extraction, _ = scan
    ids = match_truth(truth, extraction)

    for anomaly, impurity_id in zip(truth["anomalies"], ids):
        row_min, row_max, col_min, col_max = anomaly["box"]
        padded = [row_min - 1, row_max + 1, col_min - 1, col_max + 1]
        assert extraction.boxes[impurity_id].tolist() == padded, anomaly


def test_large_isolated_in_top_scores(scan):
    _, truth, extraction, scores = scan
    ids = match_truth(truth, extraction)
    ranked = extraction.indices[np.argsort(-scores[extraction.indices], kind="stable")]
    top_count = int(np.ceil(0.05 * len(ranked)))

    for impurity_id in _ids_of_kind(truth, ids, {LARGE_ISOLATED}):
        rank = int(np.flatnonzero(ranked == impurity_id)[0]) + 1
        assert rank <= top_count, f"impurity {impurity_id} ranks {rank} of {len(ranked)}"


def test_elongated_and_cross_not_round(scan):
    _, truth, extraction, _ = scan
    ids = match_truth(truth, extraction)

    for impurity_id in _ids_of_kind(truth, ids, {ELONGATED, CROSS}):
        assert _enclosing_circle_ratio(extraction, impurity_id) > 0.55, impurity_id


def test_dots_mostly_round(scan):
    _, truth, extraction, _ = scan
    anomaly_ids = set(match_truth(truth, extraction).tolist())
    dot_ids = [int(i) for i in extraction.indices if int(i) not in anomaly_ids]

    ratios = np.array([_enclosing_circle_ratio(extraction, i) for i in dot_ids])

    assert len(dot_ids) == truth["placed_dot_count"]
    assert np.mean(ratios <= 0.3) >= 0.9


def test_match_truth_background_centre(scan):
    _, truth, extraction, _ = scan
    background_row, background_col = np.argwhere(extraction.markers == 1)[0]
    moved = dict(truth, anomalies=[{"kind": CROSS, "centre": [int(background_row), int(background_col)]}])

    assert match_truth(moved, extraction).tolist() == [-1]


def test_match_truth_rejects_other_size(scan):
    _, truth, extraction, _ = scan
    other = dict(truth, height=truth["height"] + 1)

    with pytest.raises(ValueError, match="truth"):
        match_truth(other, extraction)


def test_match_truth_rejects_missing_key(scan):
    _, truth, extraction, _ = scan
    incomplete = {key: value for key, value in truth.items() if key != "anomalies"}

    with pytest.raises(ValueError, match="anomalies"):
        match_truth(incomplete, extraction)


# Shipped examples


def test_shipped_examples_exist():
    truth_paths = _shipped_truth_paths()

    assert len(truth_paths) == 3
    for number, truth_path in enumerate(truth_paths, start=1):
        image_path = EXAMPLES_DIR / f"synthetic_{number}.png"
        assert truth_path.name == f"synthetic_{number}_truth.json"
        assert image_path.exists()
        assert image_path.stat().st_size <= MAX_EXAMPLE_BYTES


def test_shipped_examples_match_generator(tmp_path):
    truth_paths = _shipped_truth_paths()
    first_seed = json.loads(truth_paths[0].read_text())["seed"]

    written = write_examples(tmp_path, len(truth_paths), first_seed)

    for truth_path, (image_path, new_truth_path) in zip(truth_paths, written):
        shipped_path = truth_path.with_name(truth_path.name.replace("_truth.json", ".png"))
        shipped_image = cv2.imread(str(shipped_path), cv2.IMREAD_UNCHANGED)
        new_image = cv2.imread(image_path, cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(shipped_image, new_image, err_msg=f"{truth_path.name}: remake the examples")
        assert json.loads(truth_path.read_text()) == json.loads(Path(new_truth_path).read_text())


def test_command_line_writes_scan(tmp_path):
    command = [
        sys.executable, "synthetic_scans.py", f"--output_dir={tmp_path}",
        "--count=2", "--seed=5", "--height=400", "--width=500",
    ]

    subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True, timeout=120)

    for number, seed in [(1, 5), (2, 6)]:
        image = cv2.imread(str(tmp_path / f"synthetic_{number}.png"), cv2.IMREAD_UNCHANGED)
        truth = json.loads((tmp_path / f"synthetic_{number}_truth.json").read_text())
        expected, _ = generate_scan(seed, height=400, width=500)
        assert truth["seed"] == seed
        np.testing.assert_array_equal(image, expected)


# Input checks


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("seed", -1),
        ("seed", 1.5),
        ("seed", True),
        ("height", 399),
        ("width", "1500"),
        ("dot_count", -1),
        ("large_count", -2),
        ("elongated_count", None),
        ("cross_count", 2.0),
        ("patch_member_count", -1),
    ],
)
def test_generate_scan_rejects_bad_argument(argument, value):
    arguments = {"seed": 0, argument: value}

    with pytest.raises(ValueError, match=argument):
        generate_scan(**arguments)


@pytest.mark.parametrize(("argument", "value"), [("count", 0), ("seed", -3)])
def test_write_examples_rejects_bad_argument(tmp_path, argument, value):
    arguments = {"output_dir": tmp_path, "count": 1, "seed": 0, argument: value}

    with pytest.raises(ValueError, match=argument):
        write_examples(**arguments)
    assert not list(tmp_path.iterdir())
