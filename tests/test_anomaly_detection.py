"""End-to-end tests of the main command, run as a subprocess like a user would."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from synthetic_scans import generate_scan

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, str(REPO_ROOT / "anomaly_detection.py")]


def _run(args, cwd, timeout=300):
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", MPLBACKEND="Agg")
    return subprocess.run(
        COMMAND + list(args), cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )


def _write_scan(path, seed, height=500, width=600, **counts):
    options = dict(dot_count=60, large_count=1, elongated_count=1, cross_count=1, patch_member_count=0)
    options.update(counts)
    image, truth = generate_scan(seed, height=height, width=width, **options)
    cv2.imwrite(str(path), image)
    return truth


def _output_flags(root):
    return [f"--logs_dir={root / 'logs'}", f"--area_anomaly_dir={root / 'logs' / 'area'}"]


def _log_entries(root):
    return json.loads((root / "logs" / "area" / "clusters_scores.txt").read_text())


def _error_lines(completed):
    return [line for line in completed.stderr.splitlines() if line.startswith("E")]


@pytest.fixture
def scans(tmp_path):
    """Three small synthetic scans in tmp_path/scans."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for seed in range(3):
        _write_scan(folder / f"scan_{seed}.png", seed)
    return folder


def test_full_run_writes_outputs(tmp_path, scans):
    completed = _run(
        [f"--input_scans={scans}/*.png", "--min_threshold=30", "--shape_anomaly=False", "--k=5,50"]
        + _output_flags(tmp_path)
        + ["--order", "--print_order", "--top_ranked=3"],
        cwd=tmp_path,
    )

    assert completed.returncode == 0, completed.stderr
    scan_dir = tmp_path / "logs" / "scan_0"
    for name in ["impurities.csv", "spatial_anomaly_k5.png", "spatial_anomaly_k50.png"]:
        assert (scan_dir / name).is_file(), name

    table = pd.read_csv(scan_dir / "impurities.csv")
    for column in ["id", "label", "area_px", "centroid_row", "significant", "spatial_k5", "spatial_k50", "circle_ratio", "cluster"]:
        assert column in table.columns, column
    assert table["spatial_k50"].between(0, 1).all()
    assert table["spatial_k50"].max() == 1.0

    entries = _log_entries(tmp_path)
    assert sorted(entry["scan_name"] for entry in entries) == ["scan_0", "scan_1", "scan_2"]
    area = tmp_path / "logs" / "area"
    assert (area / "ordered_clusters_scores.json").is_file()
    assert (area / "order_weighted_area2_sum_mult_diameter_mult_amount.csv").is_file()
    assert "scan_0" in completed.stdout
    assert "nan" not in (area / "ordered_clusters_scores.json").read_text().lower()


def test_rerun_skips_and_overwrite_redoes(tmp_path, scans):
    args = [f"--input_scans={scans}/*.png", "--min_threshold=30", "--shape_anomaly=False"] + _output_flags(tmp_path)
    assert _run(args, cwd=tmp_path).returncode == 0
    table = tmp_path / "logs" / "scan_1" / "impurities.csv"
    first_mtime = table.stat().st_mtime_ns

    again = _run(args, cwd=tmp_path)
    assert again.returncode == 0
    assert "skipped" in again.stderr
    assert table.stat().st_mtime_ns == first_mtime
    assert len(_log_entries(tmp_path)) == 3

    redo = _run(args + ["--overwrite"], cwd=tmp_path)
    assert redo.returncode == 0
    assert table.stat().st_mtime_ns != first_mtime
    assert len(_log_entries(tmp_path)) == 3


def test_bad_file_in_batch(tmp_path, scans):
    (scans / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (scans / "empty.png").write_bytes(b"")

    completed = _run(
        [f"--input_scans={scans}/*.png", "--min_threshold=30", "--shape_anomaly=False"] + _output_flags(tmp_path),
        cwd=tmp_path,
    )

    assert completed.returncode == 1
    assert "2 of 5 scans failed" in completed.stderr
    assert "broken.png" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert sorted(entry["scan_name"] for entry in _log_entries(tmp_path)) == ["scan_0", "scan_1", "scan_2"]


def test_blank_scan_gives_empty_outputs(tmp_path):
    cv2.imwrite(str(tmp_path / "blank.png"), np.full((200, 300), 255, np.uint8))

    completed = _run(
        [f"--input_scans={tmp_path}/blank.png", "--min_threshold=30", "--shape_anomaly=False"] + _output_flags(tmp_path),
        cwd=tmp_path,
    )

    assert completed.returncode == 0, completed.stderr
    assert "no significant impurity" in completed.stderr
    table = pd.read_csv(tmp_path / "logs" / "blank" / "impurities.csv")
    assert len(table) == 0
    assert _log_entries(tmp_path)[0]["clusters"] == []


def test_single_impurity_scan(tmp_path):
    image = np.full((200, 300), 255, np.uint8)
    cv2.circle(image, (150, 100), 8, 0, -1)
    cv2.imwrite(str(tmp_path / "one.png"), image)

    completed = _run(
        [f"--input_scans={tmp_path}/one.png", "--min_threshold=30", "--shape_anomaly=False"] + _output_flags(tmp_path),
        cwd=tmp_path,
    )

    assert completed.returncode == 0, completed.stderr
    table = pd.read_csv(tmp_path / "logs" / "one" / "impurities.csv")
    assert len(table) == 1
    assert table["spatial_k50"].tolist() == [0.0]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--input_scans=nowhere/*.png"], "matches no file"),
        (["--min_threshold=300"], "--min_threshold=300"),
        (["--min_threshold=-1"], "--min_threshold=-1"),
        (["--k=0"], "--k=0"),
        (["--k=-5"], "--k=-5"),
        (["--area_clusters=0"], "--area_clusters=0"),
    ],
)
def test_invalid_flags_one_line_error(tmp_path, args, expected):
    completed = _run(args, cwd=tmp_path)

    assert completed.returncode == 2
    errors = _error_lines(completed)
    assert len(errors) == 1
    assert expected in errors[0]
    assert "Traceback" not in completed.stderr


def test_unknown_shape_loss_rejected(tmp_path):
    completed = _run(["--shape_loss=bogus"], cwd=tmp_path)

    assert completed.returncode != 0
    assert "--shape_loss" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_directory_as_scan(tmp_path):
    (tmp_path / "folder.png").mkdir()

    completed = _run([f"--input_scans={tmp_path}/folder.png"], cwd=tmp_path)

    assert completed.returncode == 2
    assert "only folders" in completed.stderr


def test_missing_model_named(tmp_path, scans):
    completed = _run(
        [f"--input_scans={scans}/*.png", f"--model_name={tmp_path}/absent.keras"] + _output_flags(tmp_path),
        cwd=tmp_path,
    )

    assert completed.returncode == 2
    assert "absent.keras" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_unwritable_output_folder(tmp_path, scans):
    (tmp_path / "blocker").write_text("a file where a folder should be")

    completed = _run(
        [f"--input_scans={scans}/*.png", "--shape_anomaly=False", f"--logs_dir={tmp_path}/blocker/logs"],
        cwd=tmp_path,
    )

    assert completed.returncode == 2
    assert "blocker" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_traceback_at_verbosity_one(tmp_path):
    completed = _run(["--input_scans=nowhere/*.png", "--verbosity=1"], cwd=tmp_path)

    assert completed.returncode == 2
    assert "Traceback" in completed.stderr


def test_print_order_without_detection(tmp_path, scans):
    args = [f"--input_scans={scans}/*.png", "--min_threshold=30", "--shape_anomaly=False"] + _output_flags(tmp_path)
    assert _run(args, cwd=tmp_path).returncode == 0

    completed = _run(
        ["--detect=False", "--print_order", "--input_scans=gone/*.png"] + _output_flags(tmp_path), cwd=tmp_path
    )

    assert completed.returncode == 0, completed.stderr
    for name in ["scan_0", "scan_1", "scan_2"]:
        assert name in completed.stdout


def test_print_order_without_log(tmp_path):
    completed = _run(["--detect=False", "--print_order"] + _output_flags(tmp_path), cwd=tmp_path)

    assert completed.returncode == 2
    assert "clusters log" in completed.stderr


def _comparable_entries(root):
    entries = _log_entries(root)
    for entry in entries:
        entry.pop("plot_path")
    return sorted(entries, key=lambda entry: entry["scan_name"])


def test_killed_run_resumes_to_same_result(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for seed in range(6):
        _write_scan(scans / f"scan_{seed}.png", seed + 10)
    args = [f"--input_scans={scans}/*.png", "--min_threshold=30", "--shape_anomaly=False"]

    reference_root = tmp_path / "uninterrupted"
    assert _run(args + _output_flags(reference_root), cwd=tmp_path).returncode == 0

    killed_root = tmp_path / "killed"
    log_path = killed_root / "logs" / "area" / "clusters_scores.txt"
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", MPLBACKEND="Agg")
    process = subprocess.Popen(
        COMMAND + args + _output_flags(killed_root), cwd=tmp_path, env=environment,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if log_path.exists() and len(json.loads(log_path.read_text())) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()

    # Only complete files remain, and the log holds every finished scan.
    finished = json.loads(log_path.read_text())
    assert 2 <= len(finished) < 6
    for entry in finished:
        assert (killed_root / "logs" / entry["scan_name"] / "impurities.csv").is_file()

    resumed = _run(args + _output_flags(killed_root), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert _comparable_entries(killed_root) == _comparable_entries(reference_root)
    for seed in range(6):
        name = f"scan_{seed}/impurities.csv"
        assert (killed_root / "logs" / name).read_text() == (reference_root / "logs" / name).read_text()
    leftovers = [path.name for path in (killed_root / "logs").rglob("*") if ".tmp" in path.name]
    assert leftovers == [] or all(path.startswith(".") for path in leftovers)


def test_concurrent_runs_share_log(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    for seed in range(3):
        _write_scan(first / f"a_{seed}.png", seed + 20)
        _write_scan(second / f"b_{seed}.png", seed + 30)
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", MPLBACKEND="Agg")

    processes = [
        subprocess.Popen(
            COMMAND + [f"--input_scans={folder}/*.png", "--min_threshold=30", "--shape_anomaly=False"]
            + _output_flags(tmp_path),
            cwd=tmp_path, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for folder in (first, second)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr

    names = sorted(entry["scan_name"] for entry in _log_entries(tmp_path))
    assert names == ["a_0", "a_1", "a_2", "b_0", "b_1", "b_2"]
