"""Tests of split_data: split sizes, seeding, scan groups and input errors."""

import os
import subprocess
import sys

import pandas as pd
import pytest

import split_data
from split_data import SplitDataError, parse_crop_name, split_dataset, split_sizes, validate_fractions

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_crops(folder, class_name, scans, per_scan, ratio):
    class_dir = folder / class_name
    class_dir.mkdir(parents=True, exist_ok=True)
    for scan in scans:
        for impurity_id in range(per_scan):
            (class_dir / f"{ratio}{scan}_impurity_{impurity_id}.png").write_bytes(b"png")


@pytest.fixture
def crops_dir(tmp_path):
    """10 normal and 5 anomalous crop files from 5 scans."""
    folder = tmp_path / "rescaled"
    scans = [f"scan1tag-{n}" for n in range(5)]
    _write_crops(folder, "normal", scans, 2, "0.1327")
    _write_crops(folder, "anomaly", scans, 1, "0.8")
    return folder


def _files(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _manifest(output_dir, name="shape"):
    return pd.read_csv(output_dir / name / split_data.MANIFEST_NAME)


def test_split_counts_exact(crops_dir, tmp_path):
    counts = split_dataset(crops_dir, tmp_path / "out", "shape", n_classes=2, seed=3)

    expected = {
        "train": {"normal": 6, "anomaly": 3},
        "validation": {"normal": 2, "anomaly": 1},
        "test": {"normal": 2, "anomaly": 1},
    }
    assert counts == expected
    for split, per_class in expected.items():
        for class_name, n in per_class.items():
            assert len(_files(tmp_path / "out" / "shape" / split / class_name)) == n


def test_split_every_crop_once(crops_dir, tmp_path):
    split_dataset(crops_dir, tmp_path / "out", "shape", seed=3)

    written = []
    for split in split_data.SPLITS:
        for class_name in split_data.CLASSES:
            written += [(class_name, name) for name in _files(tmp_path / "out" / "shape" / split / class_name)]
    source = [(c, name) for c in split_data.CLASSES for name in _files(crops_dir / c)]
    assert sorted(written) == sorted(source)


def test_split_one_class(crops_dir, tmp_path):
    counts = split_dataset(crops_dir, tmp_path / "out", "shape", n_classes=1, seed=3)

    assert counts == {"train": {"normal": 6}, "validation": {"normal": 2}, "test": {"normal": 2}}
    assert not os.path.exists(tmp_path / "out" / "shape" / "train" / "anomaly")


def test_split_seed_reproducible(crops_dir, tmp_path):
    split_dataset(crops_dir, tmp_path / "a", "shape", seed=7)
    split_dataset(crops_dir, tmp_path / "b", "shape", seed=7)
    split_dataset(crops_dir, tmp_path / "c", "shape", seed=8)

    first = _manifest(tmp_path / "a")
    assert first.equals(_manifest(tmp_path / "b"))
    assert not first.equals(_manifest(tmp_path / "c"))


def test_group_by_scan_keeps_scans(tmp_path):
    folder = tmp_path / "rescaled"
    scans = [f"scan{s}tag-{n}" for s in (1, 2) for n in range(10)]
    _write_crops(folder, "normal", scans, 4, "0.25")
    _write_crops(folder, "anomaly", scans[::2], 2, "0.9")

    counts = split_dataset(folder, tmp_path / "out", "shape", seed=1, group_by_scan=True)

    manifest = _manifest(tmp_path / "out")
    manifest["scan"] = [parse_crop_name(name)[1] for name in manifest["file"]]
    splits_per_scan = manifest.groupby("scan")["split"].nunique()
    assert (splits_per_scan == 1).all()
    assert manifest["scan"].nunique() == 20
    # 100 crops in runs of 4 or 6 per scan: each split is within one scan of its share.
    totals = {split: sum(per_class.values()) for split, per_class in counts.items()}
    assert abs(totals["train"] - 60) <= 6
    assert abs(totals["test"] - 20) <= 6


def test_group_by_scan_bad_name(crops_dir, tmp_path):
    (crops_dir / "normal" / "stray.png").write_bytes(b"png")

    with pytest.raises(SplitDataError, match="stray.png"):
        split_dataset(crops_dir, tmp_path / "out", "shape", group_by_scan=True)


def test_refuses_non_empty_output(crops_dir, tmp_path):
    split_dataset(crops_dir, tmp_path / "out", "shape")

    with pytest.raises(SplitDataError, match=r"out/shape is not empty; pass --overwrite"):
        split_dataset(crops_dir, tmp_path / "out", "shape")


def test_overwrite_replaces_output(crops_dir, tmp_path):
    split_dataset(crops_dir, tmp_path / "out", "shape")
    stale = tmp_path / "out" / "shape" / "train" / "normal" / "0.1stale_impurity_1.png"
    stale.write_bytes(b"png")

    split_dataset(crops_dir, tmp_path / "out", "shape", overwrite=True)

    assert not stale.exists()
    assert len(_manifest(tmp_path / "out")) == 15
    assert [name for name in os.listdir(tmp_path / "out") if name != "shape"] == []


def test_missing_input_folder(tmp_path):
    with pytest.raises(SplitDataError, match=r"input folder .*missing not found"):
        split_dataset(tmp_path / "missing", tmp_path / "out", "shape")


def test_empty_class_folder(crops_dir, tmp_path):
    for path in (crops_dir / "normal").iterdir():
        path.unlink()

    with pytest.raises(SplitDataError, match=r"normal contains no \.png crops"):
        split_dataset(crops_dir, tmp_path / "out", "shape")


def test_two_classes_without_anomaly(crops_dir, tmp_path):
    for path in (crops_dir / "anomaly").iterdir():
        path.unlink()
    (crops_dir / "anomaly").rmdir()

    with pytest.raises(SplitDataError, match=r"anomaly not found, but two classes were requested"):
        split_dataset(crops_dir, tmp_path / "out", "shape", n_classes=2)
    assert not os.path.exists(tmp_path / "out" / "shape")


def test_invalid_arguments(crops_dir, tmp_path):
    with pytest.raises(ValueError, match="n_classes"):
        split_dataset(crops_dir, tmp_path / "out", "shape", n_classes=3)
    with pytest.raises(ValueError, match="name"):
        split_dataset(crops_dir, tmp_path / "out", "a/b")
    with pytest.raises(ValueError, match="sum to 1"):
        split_dataset(crops_dir, tmp_path / "out", "shape", fractions=(0.5, 0.2, 0.2))


@pytest.mark.parametrize(
    "fractions, message",
    [((0.6, 0.4), "3 values"), ((0.6, -0.1, 0.5), "non-negative"), ((0.0, 0.5, 0.5), "train fraction")],
)
def test_validate_fractions_errors(fractions, message):
    with pytest.raises(ValueError, match=message):
        validate_fractions(fractions)


@pytest.mark.parametrize("n_items", [0, 1, 2, 5, 7, 10, 101])
def test_split_sizes_sum(n_items):
    sizes = split_sizes(n_items, (0.6, 0.2, 0.2))

    assert sum(sizes) == n_items
    assert all(abs(size - share * n_items) < 1 for size, share in zip(sizes, (0.6, 0.2, 0.2)))


@pytest.mark.parametrize(
    "filename, expected",
    [
        ("0.13270000000000001scan1tag-47_impurity_12.png", (0.13270000000000001, "scan1tag-47", 12)),
        ("1.0scan3tag-48_impurity_0.png", (1.0, "scan3tag-48", 0)),
        ("1e-05scan2tag-3_impurity_7.png", (1e-05, "scan2tag-3", 7)),
        ("-0.0026761414789406544scan2tag-13_impurity_765.png", (-0.0026761414789406544, "scan2tag-13", 765)),
        ("0.5my_scan_impurity_3_impurity_4.png", (0.5, "my_scan_impurity_3", 4)),
    ],
)
def test_parse_crop_name(filename, expected):
    assert parse_crop_name(filename) == expected


def test_parse_crop_name_invalid():
    with pytest.raises(ValueError, match="does not match"):
        parse_crop_name("scan1tag-47_impurity_12.png")


def test_cli_error_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "split_data.py", f"--input_dir={tmp_path / 'missing'}", f"--output_dir={tmp_path}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "missing not found" in result.stderr
