"""Tests of the per-scan pipeline: impurity table, clusters log checks and console output."""

import io
import json
import logging
import sys

import numpy as np
import pandas as pd
import pytest

import scan_pipeline
from impurity_extract import ImpurityExtraction, extract_from_image
from scan_pipeline import PipelineConfig


def _scene():
    """Two blocks, a 1-px dot and an impurity id that the watershed left with no pixels."""
    markers = np.ones((60, 80), np.int32)
    markers[10:20, 10:20] = 2  # id 0, 100 px
    markers[40, 40] = 3  # id 1, a single pixel
    # id 2 (label 4) has no pixel.
    markers[30:38, 60:70] = 5  # id 3, 80 px
    areas = np.array([100, 1, 0, 80], dtype=np.int64)
    boxes = np.array([[9, 20, 9, 20], [39, 41, 39, 41], [0, 0, 0, 0], [29, 38, 59, 70]], dtype=np.float64)
    return ImpurityExtraction(
        image=np.full((60, 80, 3), 255, np.uint8),
        markers=markers,
        boxes=boxes,
        areas=areas,
        indices=np.array([0, 3], dtype=np.int64),
    )


def _table(tmp_path, extraction):
    config = PipelineConfig(min_threshold=30, k_list=[1, 50], shape_anomaly=False)
    scores = scan_pipeline.compute_scores(extraction, config, model=None)
    table = scan_pipeline.impurity_table(extraction, scores, [], config)
    path = tmp_path / "impurities.csv"
    table.to_csv(path, index=False)
    return pd.read_csv(path)


def test_table_empty_only_where_undefined(tmp_path):
    table = _table(tmp_path, _scene())

    for column in ["box_rmin", "box_rmax", "box_cmin", "box_cmax", "centroid_row", "centroid_col"]:
        assert table[column].isna().tolist() == [False, False, True, False], column
    assert table["circle_ratio"].isna().tolist() == [False, True, True, False]
    assert table["cluster"].isna().all()


def test_table_scores_always_finite(tmp_path):
    table = _table(tmp_path, _scene())

    for column in ["spatial_k1", "spatial_k50"]:
        assert np.isfinite(table[column]).all(), column
        assert table[column].between(0, 1).all(), column
    for column in ["id", "label", "area_px", "significant"]:
        assert table[column].notna().all(), column


def test_table_no_inf_circle_ratio(tmp_path):
    # circle_scores returns inf for impurities that are not significant.
    image = np.full((60, 80), 255, np.uint8)
    image[20, 20] = 0
    image[40, 60] = 0

    table = _table(tmp_path, extract_from_image(image, 30))

    assert len(table) == 2
    assert not np.isinf(table["circle_ratio"]).any()
    assert table["circle_ratio"].isna().all()


def test_table_integer_boxes(tmp_path):
    table = _table(tmp_path, _scene())

    assert table.loc[0, ["box_rmin", "box_rmax", "box_cmin", "box_cmax"]].tolist() == [9, 20, 9, 20]
    text = (tmp_path / "impurities.csv").read_text().splitlines()
    assert text[1].startswith("0,2,9,20,9,20,100,")
    assert text[3].startswith("2,4,,,,,0,,,False,")


def _config(tmp_path):
    return PipelineConfig(
        logs_dir=str(tmp_path / "logs"),
        area_anomaly_dir=str(tmp_path / "area"),
        clusters_log=str(tmp_path / "area" / "clusters_scores.txt"),
    )


@pytest.mark.parametrize(
    "content",
    ['{"scan_name": "a"}', '[{"scan_name": 5}]', '["a"]', '[{"scan_name": "a", "clusters": "x"}]'],
)
def test_malformed_log_names_file(tmp_path, content):
    config = _config(tmp_path)
    (tmp_path / "area").mkdir()
    (tmp_path / "area" / "clusters_scores.txt").write_text(content)

    with pytest.raises(ValueError, match="clusters_scores.txt is not a clusters log"):
        scan_pipeline.finished_scans(config)
    with pytest.raises(ValueError, match="clusters_scores.txt is not a clusters log"):
        scan_pipeline.order_log(config)


def test_log_folder_names_path(tmp_path):
    config = _config(tmp_path)
    (tmp_path / "area" / "clusters_scores.txt").mkdir(parents=True)

    with pytest.raises(ValueError, match="clusters_scores.txt is a folder"):
        scan_pipeline.finished_scans(config)


def test_mostly_impurity_scan_warns(caplog):
    black = extract_from_image(np.zeros((50, 60), np.uint8), 30)

    with caplog.at_level(logging.WARNING, logger="mlography"):
        scan_pipeline._warn_if_mostly_impurity("dark", black, 30)

    assert "dark: impurity pixels cover" in caplog.text
    assert "--min_threshold=30" in caplog.text


def test_normal_scan_does_not_warn(caplog):
    image = np.full((50, 60), 255, np.uint8)
    image[10:20, 10:20] = 0

    with caplog.at_level(logging.WARNING, logger="mlography"):
        scan_pipeline._warn_if_mostly_impurity("light", extract_from_image(image, 30), 30)

    assert caplog.text == ""


class _Bar:
    def __init__(self, disable):
        self.disable = disable


@pytest.fixture
def console_handler():
    """A root-logger handler on a StringIO, which each test installs as sys.stderr.

    pytest's output capture sets sys.stderr again when the test call
    starts, so a replacement made in the fixture does not last.
    """
    console = io.StringIO()
    handler = logging.StreamHandler(console)
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler, console
    root.removeHandler(handler)


def test_log_lines_go_through_bar(console_handler, monkeypatch):
    handler, console = console_handler
    monkeypatch.setattr(sys, "stderr", console)

    with scan_pipeline._log_above_bar(_Bar(disable=False)):
        assert isinstance(handler.stream, scan_pipeline._BarSafeStream)
        logging.getLogger("mlography").warning("scan_a: 3 impurities")

    assert handler.stream is console
    assert "scan_a: 3 impurities\n" in console.getvalue()


def test_no_bar_keeps_stream(console_handler, monkeypatch):
    handler, console = console_handler
    monkeypatch.setattr(sys, "stderr", console)

    with scan_pipeline._log_above_bar(_Bar(disable=True)):
        assert handler.stream is console


def test_finished_scans_need_table(tmp_path):
    config = _config(tmp_path)
    (tmp_path / "area").mkdir()
    entries = [{"scan_name": "done", "clusters": []}, {"scan_name": "no_table", "clusters": []}]
    (tmp_path / "area" / "clusters_scores.txt").write_text(json.dumps(entries))
    (tmp_path / "logs" / "done").mkdir(parents=True)
    (tmp_path / "logs" / "done" / "impurities.csv").write_text("id\n")

    assert scan_pipeline.finished_scans(config) == {"done"}
