import hashlib

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import REFERENCE_SCANS
from impurity_extract import (
    ScanReadError,
    extract_from_image,
    extract_impurities,
    normalize_image,
    read_scan,
)


def _white(height=40, width=50):
    return np.full((height, width), 255, np.uint8)


def _scene():
    """A 5x5 square, a 1-px dot and a 3x4 block touching the image corner."""
    image = _white()
    image[10:15, 20:25] = 0
    image[30, 30] = 0
    image[0:3, 0:4] = 0
    return image


def test_square_box_and_area():
    image = _white()
    image[10:15, 20:25] = 0

    result = extract_from_image(image, 30)

    assert result.n_impurities == 1
    assert result.areas.tolist() == [25]
    # Pixels span rows 10..14 and columns 20..24; the box pads each side by 1.
    assert result.boxes.tolist() == [[9.0, 15.0, 19.0, 25.0]]
    assert result.indices.tolist() == [0]
    assert result.markers.dtype == np.int32
    assert np.count_nonzero(result.markers == 2) == 25


def test_scene_ids_follow_seed_order():
    result = extract_from_image(_scene(), 30)

    # Seeds are numbered in raster order: the corner block, the square, the dot.
    assert result.areas.tolist() == [6, 25, 1]
    assert result.boxes[0].tolist() == [0.0, 3.0, 0.0, 4.0]
    assert result.boxes[2].tolist() == [29.0, 31.0, 29.0, 31.0]
    assert result.indices.tolist() == [0, 1]


def test_border_impurity_loses_border_pixels():
    # The watershed marks the 1-px image border as boundary (-1), so the
    # 3x4 corner block keeps only its 2x3 inner pixels.
    result = extract_from_image(_scene(), 30)

    assert result.areas[0] == 6
    assert np.all(result.markers[0, :] == -1)
    assert np.all(result.markers[:, 0] == -1)


def test_blank_image_no_impurities():
    result = extract_from_image(_white(), 30)

    assert result.n_impurities == 0
    assert result.boxes.shape == (0, 4)
    assert result.areas.shape == (0,)
    assert result.indices.shape == (0,)


def test_single_pixel_not_significant():
    image = _white()
    image[20, 20] = 0

    result = extract_from_image(image, 30)

    assert result.areas.tolist() == [1]
    assert result.indices.tolist() == []


def test_one_pixel_line():
    image = _white()
    image[20, 5:45] = 0

    result = extract_from_image(image, 30)

    assert result.areas.tolist() == [40]
    assert result.boxes.tolist() == [[19.0, 21.0, 4.0, 45.0]]


def test_threshold_is_gray_level():
    image = _white()
    image[10:15, 10:15] = 25
    image[25:30, 25:30] = 35

    at_30 = extract_from_image(image, 30)
    at_40 = extract_from_image(image, 40)

    assert at_30.n_impurities == 1
    assert at_40.n_impurities == 2


@pytest.mark.parametrize("bad", [-1, 256, 12.5, "30", True])
def test_invalid_threshold_rejected(bad):
    with pytest.raises((ValueError, TypeError), match="min_threshold"):
        extract_from_image(_white(), bad)


# Image types: each encoding of the scene must give the same impurities.


def _write_with_pil(path, array, mode):
    Image.fromarray(array).convert(mode).save(path)


def _assert_same_as_scene(path):
    expected = extract_from_image(_scene(), 30)
    result = extract_impurities(path, 30)
    np.testing.assert_array_equal(result.markers, expected.markers)
    np.testing.assert_array_equal(result.areas, expected.areas)


def test_one_bit_png(tmp_path):
    path = tmp_path / "scene.png"
    Image.fromarray(_scene() > 0).save(path)
    assert Image.open(path).mode == "1"

    _assert_same_as_scene(path)


@pytest.mark.parametrize("extension", ["png", "tif"])
def test_sixteen_bit_gray(tmp_path, extension):
    path = tmp_path / f"scene.{extension}"
    cv2.imwrite(str(path), _scene().astype(np.uint16) * 257)
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).dtype == np.uint16

    _assert_same_as_scene(path)


def test_sixteen_bit_scaling():
    gray16 = np.array([[0, 257, 7710, 65535]], dtype=np.uint16)

    image = normalize_image(gray16)

    assert image.dtype == np.uint8
    assert image.shape == (1, 4, 3)
    assert image[0, :, 0].tolist() == [0, 1, 30, 255]


def test_rgb_png(tmp_path):
    path = tmp_path / "scene.png"
    _write_with_pil(path, _scene(), "RGB")
    _assert_same_as_scene(path)


def test_palette_png(tmp_path):
    path = tmp_path / "scene.png"
    _write_with_pil(path, _scene(), "P")
    assert Image.open(path).mode == "P"
    _assert_same_as_scene(path)


def test_rgba_transparent_is_background(tmp_path):
    # Transparent black pixels everywhere except the scene's impurities.
    scene = _scene()
    rgba = np.zeros(scene.shape + (4,), np.uint8)
    rgba[..., 3] = np.where(scene == 0, 255, 0)
    path = tmp_path / "scene.png"
    Image.fromarray(rgba, "RGBA").save(path)

    _assert_same_as_scene(path)


def test_gray_alpha_transparent_is_background(tmp_path):
    scene = _scene()
    gray_alpha = np.zeros(scene.shape + (2,), np.uint8)
    gray_alpha[..., 1] = np.where(scene == 0, 255, 0)
    path = tmp_path / "scene.png"
    Image.fromarray(gray_alpha, "LA").save(path)
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).shape[2] in (2, 4)

    _assert_same_as_scene(path)


def test_half_transparent_composite():
    gray_alpha = np.array([[[0, 128]]], dtype=np.uint8)

    image = normalize_image(gray_alpha)

    # 0 * 128/255 + 255 * (1 - 128/255) = 127
    assert image[0, 0].tolist() == [127, 127, 127]


def test_unsupported_shape_rejected():
    with pytest.raises(ValueError, match="shape"):
        normalize_image(np.zeros((4, 4, 5), np.uint8))


# Unreadable input.


def test_missing_file(tmp_path):
    with pytest.raises(ScanReadError, match="not found"):
        read_scan(tmp_path / "missing.png")


def test_directory_rejected(tmp_path):
    with pytest.raises(ScanReadError, match="directory"):
        read_scan(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ScanReadError, match="empty"):
        read_scan(path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(ScanReadError, match="cannot decode"):
        read_scan(path)


def test_truncated_png(tmp_path):
    path = tmp_path / "cut.png"
    ok, encoded = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8))
    assert ok
    path.write_bytes(encoded.tobytes()[:500])
    with pytest.raises(ScanReadError, match=str(path)):
        read_scan(path)


def _jpeg_bytes():
    image = np.full((200, 300), 255, np.uint8)
    cv2.circle(image, (150, 100), 20, 0, -1)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return encoded.tobytes()


def test_complete_jpeg_reads(tmp_path):
    path = tmp_path / "whole.jpg"
    path.write_bytes(_jpeg_bytes())

    result = extract_impurities(path, 30)

    assert len(result.indices) == 1


@pytest.mark.parametrize("kept", [0.5, 0.9])
def test_truncated_jpeg_rejected(tmp_path, kept):
    # OpenCV decodes a truncated JPEG without an error, so the check must
    # come from read_scan itself.
    data = _jpeg_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: int(len(data) * kept)])
    assert cv2.imread(str(path)) is not None

    with pytest.raises(ScanReadError, match="truncated JPEG") as error:
        read_scan(path)
    assert str(path) in str(error.value)


def test_white_is_zero_ccitt_tiff(tmp_path):
    from PIL import TiffImagePlugin

    path = tmp_path / "scene.tif"
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[262] = 0  # PhotometricInterpretation: WhiteIsZero
    Image.fromarray(_scene() > 0).save(path, compression="group4", tiffinfo=tags)
    with Image.open(path) as saved:
        assert saved.tag_v2[262] == 0
        assert saved.info["compression"] == "group4"

    _assert_same_as_scene(path)


# Real scans.


@pytest.mark.parametrize("scan", REFERENCE_SCANS)
def test_extraction_matches_reference(scans_dir, reference_dir, scan):
    reference = np.load(reference_dir / f"{scan}.npz")

    result = extract_impurities(scans_dir / f"{scan}.png", 30)

    markers_hash = hashlib.sha256(np.ascontiguousarray(result.markers, dtype=np.int32).tobytes()).hexdigest()
    assert markers_hash == str(reference["markers_sha256"])
    assert result.n_impurities == int(reference["ret"]) - 1
    assert np.count_nonzero(result.markers == -1) == int(reference["n_boundary_pixels"])
    np.testing.assert_array_equal(result.boxes, reference["imp_boxes"])
    np.testing.assert_array_equal(result.areas, reference["areas"])
    np.testing.assert_array_equal(result.indices, reference["indices"])


def test_gray_alpha_scan_loads(scans_dir):
    result = extract_impurities(scans_dir / "scan2tag-43.png", 30)

    assert result.image.shape[2] == 3
    # Impurities are dark on white: only a small fraction of pixels is dark.
    assert 0.0 < np.mean(result.image[..., 0] < 30) < 0.1
    assert len(result.indices) > 100


def test_uncropped_one_bit_scan_loads(scans_dir):
    result = extract_impurities(scans_dir / "scan1tag-12.png", 30)

    assert result.image.shape[:2] == (3285, 4676)
    assert 0.0 < np.mean(result.image[..., 0] < 30) < 0.1
    assert len(result.indices) > 100


@pytest.mark.parametrize(
    "page, cropped",
    [("scan1tag47", "scan1tag-47"), ("scan2tag34", "scan2tag-34"), ("scan3tag48", "scan3tag-48")],
)
def test_ccitt_tiff_polarity_and_count(tif_dir, scans_dir, page, cropped):
    page_result = extract_impurities(tif_dir / f"{page}.tif", 30)
    cropped_result = extract_impurities(scans_dir / f"{cropped}.png", 30)

    # WhiteIsZero must decode to dark impurities on a white page.
    dark_fraction = np.mean(page_result.image[..., 0] < 30)
    assert 0.001 < dark_fraction < 0.05

    # NOTE: the raw pages hold a scale bar, margins and scanner specks that
    # the cropped PNGs lack, so the counts agree only within a factor of 2.
    ratio = len(page_result.indices) / len(cropped_result.indices)
    assert 0.5 < ratio < 2.0


def test_pixel_limit_names_variable(tmp_path):
    import os
    import subprocess
    import sys

    path = tmp_path / "large.png"
    cv2.imwrite(str(path), _white(30, 30))
    script = (
        "import sys\n"
        "from impurity_extract import read_scan, ScanReadError\n"
        "try:\n"
        f"    read_scan({str(path)!r})\n"
        "except ScanReadError as error:\n"
        "    print(error)\n"
    )
    environment = dict(os.environ, OPENCV_IO_MAX_IMAGE_PIXELS="100")
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=repo_root, env=environment, capture_output=True, text=True, timeout=60
    )

    assert "OPENCV_IO_MAX_IMAGE_PIXELS" in completed.stdout
