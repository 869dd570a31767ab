"""Read a metallographic scan and extract its impurities with a watershed.

The steps follow the published MLography method: grayscale, inverse binary
threshold at ``min_threshold``, a 3x3 morphological closing (the sure
foreground), a 3-iteration dilation (the sure background), connected
components as watershed seeds, and ``cv2.watershed`` on the colour image.

In the resulting label image, watershed boundaries are -1, the background is
1, and impurity id ``i`` has label ``i + 2``.
"""

import logging
import os
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

#: Impurities with an area above this many pixels are significant.
SIGNIFICANT_AREA_PX = 3

#: Label of impurity id 0; impurity id ``i`` has label ``i + FIRST_IMPURITY_LABEL``.
FIRST_IMPURITY_LABEL = 2

_KERNEL_3X3 = np.ones((3, 3), np.uint8)


class ScanReadError(ValueError):
    """Raised when a scan cannot be read as an image."""


@dataclass
class ImpurityExtraction:
    """Impurities of one scan.

    Attributes
    ----------
    image : (H, W, 3) uint8 ndarray
        The scan, normalised to 8-bit BGR.
    markers : (H, W) int32 ndarray
        Watershed label image: -1 on boundaries, 1 on the background and
        ``i + 2`` on impurity id ``i``.
    boxes : (n, 4) float64 ndarray
        Padded bounding box of each impurity id as
        ``(rmin - 1, rmax + 1, cmin - 1, cmax + 1)`` in px, where the
        limits are those of its pixels. ``(0, 0, 0, 0)`` for an impurity
        that the watershed left with no pixels.
    areas : (n,) int64 ndarray
        Pixel count of each impurity id after the watershed, in px^2.
    indices : (m,) int64 ndarray
        Ascending ids of the significant impurities (area > 3 px^2).
    """

    image: np.ndarray
    markers: np.ndarray
    boxes: np.ndarray
    areas: np.ndarray
    indices: np.ndarray

    @property
    def n_impurities(self):
        """Number of impurity ids, significant or not."""
        return len(self.areas)


def _scale_16bit_to_8bit(image):
    # Dividing by 257 maps 0..65535 onto 0..255 exactly at both ends.
    return np.round(image.astype(np.float64) / 257.0).astype(np.uint8)


def _composite_over_white(color, alpha):
    alpha = alpha.astype(np.float64)[..., None] / 255.0
    blended = color.astype(np.float64) * alpha + 255.0 * (1.0 - alpha)
    return np.round(blended).astype(np.uint8)


def normalize_image(image, source="image"):
    """Convert a decoded image to 8-bit, 3-channel BGR.

    Parameters
    ----------
    image : ndarray
        An image as returned by ``cv2.imread(path, cv2.IMREAD_UNCHANGED)``:
        2-D gray, or 3-D with 1 (gray), 2 (gray + alpha), 3 (BGR) or
        4 (BGRA) channels, of dtype bool, uint8, uint16 or float.
    source : str
        Name of the image for error messages.

    Returns
    -------
    (H, W, 3) uint8 ndarray
        The image in BGR. 16-bit images are scaled to 8 bit by dividing by
        257, so ``min_threshold`` always is a gray level from 0 to 255.
        Float images are taken as 0..1 and scaled by 255. Transparent pixels
        of gray + alpha and BGRA images are composited over white, so they
        count as background.

    Raises
    ------
    ValueError
        If the image has a shape or dtype that is not listed above.
    """
    if image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    elif image.dtype == np.uint16:
        image = _scale_16bit_to_8bit(image)
    elif np.issubdtype(image.dtype, np.floating):
        image = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(
            f"{source}: unsupported pixel type {image.dtype}; "
            "convert the scan to 8-bit or 16-bit PNG or TIFF"
        )

    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]

    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)

    if image.ndim != 3 or image.shape[2] not in (2, 3, 4):
        raise ValueError(
            f"{source}: unsupported image shape {image.shape}; "
            "expected a gray, gray + alpha, BGR or BGRA image"
        )

    channels = image.shape[2]
    if channels == 2:
        gray = _composite_over_white(image[:, :, 0], image[:, :, 1])
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    if channels == 4:
        return _composite_over_white(image[:, :, :3], image[:, :, 3])
    return np.ascontiguousarray(image)


def read_scan(img_path):
    """Read a scan from disk as an 8-bit BGR image.

    Parameters
    ----------
    img_path : str or os.PathLike
        Path of a PNG, TIFF, JPEG or other image that OpenCV decodes.

    Returns
    -------
    (H, W, 3) uint8 ndarray
        The scan, normalised by :func:`normalize_image`.

    Raises
    ------
    ScanReadError
        If the path is missing, is a directory, is empty, is a truncated
        JPEG, or OpenCV cannot decode it (truncated or not an image, or
        above OpenCV's pixel limit).
    """
    img_path = os.fspath(img_path)

    if not os.path.exists(img_path):
        raise ScanReadError(f"scan not found: {img_path}; check the path or glob")
    if os.path.isdir(img_path):
        raise ScanReadError(f"scan is a directory, not an image file: {img_path}")
    if os.path.getsize(img_path) == 0:
        raise ScanReadError(f"scan is an empty file: {img_path}; re-export the image")

    try:
        image = cv2.imread(img_path, cv2.IMREAD_UNCHANGED)
    except cv2.error:
        # Some decoders raise instead of returning None; the cause is the same.
        image = None

    if image is None:
        raise ScanReadError(_decode_failure_message(img_path))
    if _is_truncated_jpeg(img_path):
        raise ScanReadError(
            f"scan {img_path} is a truncated JPEG, so the end of the image is missing; "
            "copy or re-export the file again"
        )

    return normalize_image(image, source=img_path)


#: First bytes of every JPEG file (SOI marker and the next marker's prefix).
_JPEG_SIGNATURE = b"\xff\xd8\xff"


def _is_truncated_jpeg(img_path):
    # libjpeg decodes a truncated JPEG without an error and only prints
    # "Premature end of JPEG file", so decode it again with Pillow, which
    # raises on missing data. Other formats fail in cv2.imread when truncated.
    with open(img_path, "rb") as handle:
        if handle.read(len(_JPEG_SIGNATURE)) != _JPEG_SIGNATURE:
            return False

    from PIL import Image

    # OpenCV has already decoded the image within its own pixel limit, so
    # Pillow's decompression-bomb limit would only reject large scans here.
    pixel_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(img_path) as jpeg:
            jpeg.load()
    except OSError:
        return True
    finally:
        Image.MAX_IMAGE_PIXELS = pixel_limit
    return False


def _pixel_limit_message(img_path):
    return (
        f"scan {img_path} is larger than OpenCV's pixel limit; set the "
        "environment variable OPENCV_IO_MAX_IMAGE_PIXELS to a larger value "
        "(default 2**30) and rerun"
    )


def _decode_failure_message(img_path):
    # OpenCV returns None without a reason, so check the header size to tell
    # an oversized image from a corrupt one.
    height, width = _header_size(img_path)
    limit = int(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", 1 << 30))
    if height is not None and height * width > limit:
        return _pixel_limit_message(img_path)
    return (
        f"cannot decode scan {img_path}: the file is truncated or is not an "
        "image that OpenCV reads; re-export it as PNG or TIFF"
    )


def _header_size(img_path):
    try:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None
        with Image.open(img_path) as header:
            width, height = header.size
        return height, width
    except Exception:  # noqa: BLE001 - any failure means the size is unknown
        return None, None


def segment(image, min_threshold=0):
    """Compute the watershed label image of a scan.

    Parameters
    ----------
    image : (H, W, 3) uint8 ndarray
        The scan in BGR, dark impurities on a light background.
    min_threshold : int
        Gray level from 0 to 255. Pixels with a gray level above it are
        background, the others are impurity pixels.

    Returns
    -------
    markers : (H, W) int32 ndarray
        Watershed label image: -1 on boundaries (the 1-px image border
        included), 1 on the background and ``i + 2`` on impurity id ``i``.
    n_labels : int
        Label count of the seed mask, background included, so there are
        ``n_labels - 1`` impurity ids.
    """
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)

    _, mask = cv2.threshold(gray, min_threshold, 255, cv2.THRESH_BINARY_INV)

    sure_foreground = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _KERNEL_3X3, iterations=1)
    sure_background = cv2.dilate(sure_foreground, _KERNEL_3X3, iterations=3)
    unknown = cv2.subtract(sure_background, sure_foreground)

    n_labels, markers = cv2.connectedComponents(sure_foreground)
    markers = markers + 1
    markers[unknown == 255] = 0

    markers = cv2.watershed(image, markers)
    return markers, int(n_labels)


def measure_impurities(markers, n_labels):
    """Compute the padded bounding box and area of every impurity id.

    Both come from one pass over the label image.

    Parameters
    ----------
    markers : (H, W) int32 ndarray
        Watershed label image from :func:`segment`.
    n_labels : int
        Label count from :func:`segment`.

    Returns
    -------
    boxes : (n, 4) float64 ndarray
        ``(rmin - 1, rmax + 1, cmin - 1, cmax + 1)`` per impurity id in px,
        ``(0, 0, 0, 0)`` for an id with no pixels.
    areas : (n,) int64 ndarray
        Pixel count per impurity id, in px^2.
    """
    n_impurities = max(n_labels - 1, 0)

    # Shift labels so impurity id i becomes i + 1, and everything else 0.
    impurity_labels = markers - (FIRST_IMPURITY_LABEL - 1)
    impurity_labels[impurity_labels < 0] = 0

    counts = np.bincount(impurity_labels.ravel(), minlength=n_impurities + 1)
    areas = counts[1 : n_impurities + 1].astype(np.int64)

    boxes = np.zeros((n_impurities, 4), dtype=np.float64)
    slices = ndimage.find_objects(impurity_labels, max_label=n_impurities)
    for impurity_id, box_slice in enumerate(slices):
        if box_slice is None:
            continue
        rows, cols = box_slice
        boxes[impurity_id] = (rows.start - 1, rows.stop, cols.start - 1, cols.stop)

    return boxes, areas


def significant_indices(areas):
    """Return the ascending ids of impurities with an area above 3 px^2."""
    return np.flatnonzero(np.asarray(areas) > SIGNIFICANT_AREA_PX).astype(np.int64)


def validate_threshold(min_threshold):
    """Check that ``min_threshold`` is an integer gray level from 0 to 255."""
    is_number = isinstance(min_threshold, (int, float, np.integer, np.floating))
    if isinstance(min_threshold, bool) or not is_number or not float(min_threshold).is_integer():
        raise ValueError(
            f"min_threshold must be an integer gray level from 0 to 255, got {min_threshold!r}"
        )
    if not 0 <= min_threshold <= 255:
        raise ValueError(
            f"min_threshold must be from 0 to 255, got {min_threshold}; "
            "use 30 for the published scans"
        )
    return int(min_threshold)


def extract_from_image(image, min_threshold=0):
    """Extract the impurities of a scan that is already in memory.

    Parameters
    ----------
    image : ndarray
        Any image that :func:`normalize_image` accepts.
    min_threshold : int
        Gray level from 0 to 255; darker pixels are impurity pixels.

    Returns
    -------
    ImpurityExtraction
    """
    min_threshold = validate_threshold(min_threshold)
    image = normalize_image(np.asarray(image))

    markers, n_labels = segment(image, min_threshold)
    boxes, areas = measure_impurities(markers, n_labels)
    indices = significant_indices(areas)

    return ImpurityExtraction(image=image, markers=markers, boxes=boxes, areas=areas, indices=indices)


def extract_impurities(img_path, min_threshold=0):
    """Read a scan and extract its impurities.

    Parameters
    ----------
    img_path : str or os.PathLike
        Path of the scan.
    min_threshold : int
        Gray level from 0 to 255; darker pixels are impurity pixels. The
        published scans use 30.

    Returns
    -------
    ImpurityExtraction
        Image, label image, padded boxes (px), areas (px^2) and the ids of
        the significant impurities.

    Raises
    ------
    ValueError
        If ``min_threshold`` is not an integer from 0 to 255.
    ScanReadError
        If the scan cannot be read.
    """
    min_threshold = validate_threshold(min_threshold)
    image = read_scan(img_path)
    return extract_from_image(image, min_threshold)
