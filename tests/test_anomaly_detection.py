"""End-to-end tests of the main command, run as a subprocess like a user would."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import atomic_io
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
        (["--area_clusters=-3"], "--area_clusters=-3"),
        (["--k=abc"], "--k=abc"),
        (["--k="], "--k is empty"),
        (["--print_order", "--order_key=bogus"], "--order_key=bogus"),
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

    # Only complete files remain, and the log contains every finished scan.
    finished = json.loads(log_path.read_text())
    assert 2 <= len(finished) < 6
    for entry in finished:
        assert (killed_root / "logs" / entry["scan_name"] / "impurities.csv").is_file()

    # A temporary file of the scan being written may remain, but every
    # file under its final name is complete.
    for plot in (killed_root / "logs").rglob("*.png"):
        if not atomic_io.is_temporary(plot.name):
            assert cv2.imread(str(plot)) is not None, plot

    resumed = _run(args + _output_flags(killed_root), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{6 - len(finished)} scans processed, {len(finished)} skipped as finished" in resumed.stderr
    assert _comparable_entries(killed_root) == _comparable_entries(reference_root)
    for seed in range(6):
        name = f"scan_{seed}/impurities.csv"
        assert (killed_root / "logs" / name).read_text() == (reference_root / "logs" / name).read_text()
    scan_dirs = [killed_root / "logs" / f"scan_{seed}" for seed in range(6)]
    leftovers = [path.name for folder in scan_dirs for path in folder.iterdir() if atomic_io.is_temporary(path.name)]
    assert leftovers == []


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


def _order_outputs(area):
    """Relative paths of the ranking outputs, without temporary files."""
    return sorted(
        str(path.relative_to(area))
        for path in area.rglob("*")
        if path.is_file() and ".tmp" not in path.name and path.name != "clusters_scores.txt"
    )


def test_killed_order_reruns_to_same_result(tmp_path, scans):
    args = [f"--input_scans={scans}/*.png", "--min_threshold=30", "--shape_anomaly=False", "--reference_clustering"]
    assert _run(args + _output_flags(tmp_path), cwd=tmp_path).returncode == 0
    order_args = ["--detect=False", "--order", "--top_ranked=20"] + _output_flags(tmp_path)
    area = tmp_path / "logs" / "area"
    ordered_path = area / "ordered_clusters_scores.json"

    assert _run(order_args, cwd=tmp_path).returncode == 0
    reference_ranking = ordered_path.read_text()
    reference_outputs = _order_outputs(area)
    ordered_path.unlink()
    shutil.rmtree(area / "histograms")
    shutil.rmtree(area / "ordered")

    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", MPLBACKEND="Agg")
    process = subprocess.Popen(
        COMMAND + order_args, cwd=tmp_path, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if any(".tmp" not in path.name for path in (area / "histograms").rglob("*.png")):
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()

    # Killed between the ranking and the last plot: every file left is complete.
    assert ordered_path.read_text() == reference_ranking
    interrupted_outputs = _order_outputs(area)
    assert len(interrupted_outputs) < len(reference_outputs)
    for name in interrupted_outputs:
        if name.endswith(".png"):
            assert cv2.imread(str(area / name)) is not None, name
    assert len(_log_entries(tmp_path)) == 3

    assert _run(order_args, cwd=tmp_path).returncode == 0
    assert ordered_path.read_text() == reference_ranking
    assert _order_outputs(area) == reference_outputs


def _write_edge_scans(folder):
    """Scans of the hard cases, of different sizes, in several formats."""
    from PIL import Image

    white = np.full((200, 300), 255, np.uint8)
    cv2.imwrite(str(folder / "white.png"), white)
    cv2.imwrite(str(folder / "black.png"), np.zeros((120, 90), np.uint8))

    one = white.copy()
    cv2.circle(one, (150, 100), 8, 0, -1)
    cv2.imwrite(str(folder / "one.png"), one)

    border = white.copy()
    cv2.circle(border, (0, 0), 10, 0, -1)
    cv2.rectangle(border, (100, 0), (120, 5), 0, -1)
    cv2.circle(border, (200, 120), 6, 0, -1)
    cv2.imwrite(str(folder / "border.png"), border)

    pixel_and_line = white.copy()
    pixel_and_line[50, 50] = 0
    pixel_and_line[150, 20:280] = 0
    cv2.imwrite(str(folder / "pixel and line é.png"), pixel_and_line)

    twins = white.copy()
    twins[40:50, 40:50] = 0
    twins[40:50, 200:210] = 0
    cv2.imwrite(str(folder / "twins.png"), twins)

    busy, _ = generate_scan(
        3, height=400, width=500, dot_count=30, large_count=1, elongated_count=1, cross_count=1, patch_member_count=0
    )
    Image.fromarray(busy > 127).save(folder / "busy_1bit.png")
    cv2.imwrite(str(folder / "busy_16bit.tif"), busy.astype(np.uint16) * 257)
    alpha = np.where(busy < 128, 255, 0).astype(np.uint8)
    Image.fromarray(np.dstack([np.zeros_like(busy), alpha]), "LA").save(folder / "busy_gray_alpha.png")


def test_hard_cases_write_no_nan(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    _write_edge_scans(folder)

    completed = _run(
        [f"--input_scans={folder}/*", "--min_threshold=30", "--shape_anomaly=False", "--k=1,50"]
        + ["--order", "--print_order"]
        + _output_flags(tmp_path),
        cwd=tmp_path,
    )

    assert completed.returncode == 0, completed.stderr
    assert "black: impurity pixels cover" in completed.stderr
    names = sorted(entry["scan_name"] for entry in _log_entries(tmp_path))
    assert len(names) == 9
    assert "pixel and line é" in names

    score_columns = ["spatial_k1", "spatial_k50"]
    for table_path in (tmp_path / "logs").glob("*/impurities.csv"):
        table = pd.read_csv(table_path)
        for column in score_columns + ["id", "label", "area_px", "significant"]:
            assert table[column].notna().all(), (table_path, column)
        for column in score_columns:
            assert table[column].between(0, 1).all(), (table_path, column)
        # Empty cells are allowed only where the value is undefined.
        no_pixels = table["area_px"] == 0
        assert (table["centroid_row"].isna() == no_pixels).all(), table_path
        assert (table["circle_ratio"].isna() == ~table["significant"]).all(), table_path

    area = tmp_path / "logs" / "area"
    for json_path in [area / "clusters_scores.txt", area / "ordered_clusters_scores.json"]:
        json.loads(json_path.read_text(), parse_constant=lambda token: pytest.fail(f"{token} in {json_path}"))

    white = pd.read_csv(tmp_path / "logs" / "white" / "impurities.csv")
    assert len(white) == 0
    twins = pd.read_csv(tmp_path / "logs" / "twins" / "impurities.csv")
    assert twins["spatial_k1"].tolist() == [0.0, 0.0]


def test_truncated_jpeg_in_batch(tmp_path, scans):
    image = np.full((300, 400), 255, np.uint8)
    cv2.circle(image, (200, 150), 30, 0, -1)
    ok, encoded = cv2.imencode(".jpg", image)
    assert ok
    (scans / "cut.jpg").write_bytes(encoded.tobytes()[: len(encoded) // 2])

    completed = _run(
        [f"--input_scans={scans}/*", "--min_threshold=30", "--shape_anomaly=False"] + _output_flags(tmp_path),
        cwd=tmp_path,
    )

    assert completed.returncode == 1
    assert "1 of 4 scans failed" in completed.stderr
    assert "cut.jpg is a truncated JPEG" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert sorted(entry["scan_name"] for entry in _log_entries(tmp_path)) == ["scan_0", "scan_1", "scan_2"]


def test_unwritable_log_folder_fails_first(tmp_path, scans):
    (tmp_path / "blocker").write_text("a file where a folder should be")

    completed = _run(
        [f"--input_scans={scans}/*.png", "--shape_anomaly=False", f"--clusters_scores_log={tmp_path}/blocker/log.txt"]
        + _output_flags(tmp_path),
        cwd=tmp_path,
    )

    assert completed.returncode == 2
    assert len(_error_lines(completed)) == 1
    assert "blocker" in completed.stderr
    assert not (tmp_path / "logs" / "scan_0").exists()


@pytest.mark.parametrize(
    "make_log, expected",
    [
        (lambda path: path.mkdir(), "clusters_scores.txt is a folder"),
        (lambda path: path.write_text('{"scan_name": "scan_0"}'), "is not a clusters log"),
        (lambda path: path.write_bytes(b"\xff\xfe"), "clusters_scores.txt is not valid JSON"),
    ],
)
def test_unreadable_clusters_log(tmp_path, scans, make_log, expected):
    log_path = tmp_path / "logs" / "area" / "clusters_scores.txt"
    log_path.parent.mkdir(parents=True)
    make_log(log_path)

    completed = _run(
        [f"--input_scans={scans}/*.png", "--min_threshold=30", "--shape_anomaly=False"] + _output_flags(tmp_path),
        cwd=tmp_path,
    )

    assert completed.returncode == 2
    errors = _error_lines(completed)
    assert len(errors) == 1
    assert expected in errors[0]
    assert "Traceback" not in completed.stderr


def test_real_scans_of_different_sizes(tmp_path, scans_dir):
    folder = tmp_path / "scans"
    folder.mkdir()
    # The uncropped 1-bit page and the gray + alpha scan, beside a small synthetic scan.
    for name in ["scan1tag-12.png", "scan2tag-43.png"]:
        (folder / name).symlink_to(scans_dir / name)
    _write_scan(folder / "small.png", 5)

    completed = _run(
        [f"--input_scans={folder}/*.png", "--min_threshold=30", "--shape_anomaly=False"] + _output_flags(tmp_path),
        cwd=tmp_path,
    )

    assert completed.returncode == 0, completed.stderr
    assert sorted(entry["scan_name"] for entry in _log_entries(tmp_path)) == ["scan1tag-12", "scan2tag-43", "small"]
    for name in ["scan1tag-12", "scan2tag-43", "small"]:
        table = pd.read_csv(tmp_path / "logs" / name / "impurities.csv")
        assert table["significant"].sum() > 10, name
        assert table["spatial_k50"].notna().all(), name
        assert table["spatial_k50"].max() == 1.0, name
