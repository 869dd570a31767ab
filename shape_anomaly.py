"""Shape anomaly of impurities: circle ratio, normalised crops and scores.

An impurity that fills little of its minimal enclosing circle is elongated
or branched, which makes it a shape anomaly. :func:`circle_scores` measures
that ratio directly. The crops from :func:`impurity_crops` feed an
autoencoder (see ``use_model``), whose reconstruction losses
:func:`shape_scores` turns into a 0..1 score. :func:`prepare_training_data`
sorts crops of clearly round and clearly irregular impurities into the two
training classes of that autoencoder.

Label images follow :mod:`impurity_extract`: impurity id ``i`` has label
``i + 2``.
"""

import itertools
import logging
import os
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull
from tqdm import tqdm

import atomic_io
from impurity_extract import FIRST_IMPURITY_LABEL, ScanReadError, extract_impurities

logger = logging.getLogger(__name__)

#: Side of a normalised crop, in px.
CROP_SIZE = 100

#: Longer side of the impurity's box after scaling, in px. The rest of the
#: 100 px canvas is a white margin.
SCALED_SIZE = 80

#: Gray level of impurity pixels in a crop.
IMPURITY_VALUE = 0

#: Gray level of every other pixel in a crop.
BACKGROUND_VALUE = 255

#: Largest hull whose vertex triples are evaluated in one array (41,664
#: triples). Larger hulls are evaluated one first vertex at a time.
MAX_HULL_FOR_ONE_PASS = 64


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------


def _validate_markers(markers):
    markers = np.asarray(markers)
    if markers.ndim != 2 or not np.issubdtype(markers.dtype, np.integer):
        raise ValueError(
            f"markers must be a 2-D integer label image, got shape {markers.shape} "
            f"and dtype {markers.dtype}"
        )
    return markers


def _validate_areas_indices(areas, indices):
    areas = np.asarray(areas)
    indices = np.asarray(indices)

    if areas.ndim != 1 or not np.issubdtype(areas.dtype, np.number):
        raise ValueError(f"areas must be a 1-D numeric array of px^2, got shape {areas.shape} and dtype {areas.dtype}")
    if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
        raise ValueError(f"indices must be a 1-D integer array of impurity ids, got shape {indices.shape}")

    indices = indices.astype(np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= len(areas)):
        raise ValueError(f"indices must lie in 0..{len(areas) - 1}, got {indices.min()}..{indices.max()}")
    if len(np.unique(indices)) != len(indices):
        raise ValueError("indices must not contain an impurity id twice")
    return areas.astype(np.float64), indices


def _validate_boxes(boxes, indices):
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (n, 4), got {boxes.shape}")
    if indices.size and indices.max() >= len(boxes):
        raise ValueError(f"indices must lie in 0..{len(boxes) - 1} to match boxes, got up to {indices.max()}")

    chosen = boxes[indices]
    if not np.all(np.isfinite(chosen)) or np.any(chosen != np.round(chosen)):
        raise ValueError("boxes must contain whole pixel coordinates at the requested indices")

    chosen = chosen.astype(np.int64)
    empty = (chosen[:, 1] <= chosen[:, 0]) | (chosen[:, 3] <= chosen[:, 2])
    if np.any(empty):
        raise ValueError(
            f"boxes of impurity ids {indices[empty][:5].tolist()} are empty; "
            "pass only ids of impurities that have pixels (the significant indices)"
        )
    return chosen


# ---------------------------------------------------------------------------
# Minimal enclosing circle
# ---------------------------------------------------------------------------


def _impurity_slices(markers, n_impurities):
    """Return the ``find_objects`` slice of every impurity id (None when empty)."""
    impurity_labels = markers.astype(np.int64) - (FIRST_IMPURITY_LABEL - 1)
    impurity_labels[impurity_labels < 0] = 0
    return impurity_labels, ndimage.find_objects(impurity_labels, max_label=n_impurities)


def _row_extremes(mask, row_offset, col_offset):
    """Return the first and last pixel of every row of ``mask`` as (k, 2) int64 (row, col).

    The convex hull of these points is the convex hull of all pixels of the
    mask, so they are enough for the enclosing circle.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    width = mask.shape[1]
    first = mask[rows].argmax(axis=1)
    last = width - 1 - mask[rows, ::-1].argmax(axis=1)

    points = np.concatenate([np.column_stack([rows, first]), np.column_stack([rows, last])])
    points = points.astype(np.int64)
    points[:, 0] += row_offset
    points[:, 1] += col_offset
    return points


def _are_collinear(points):
    """Check exactly, in integer arithmetic, whether all points lie on one line."""
    origin = points[0]
    offsets = points - origin
    distinct = np.flatnonzero(np.any(offsets != 0, axis=1))
    if distinct.size == 0:
        return True
    direction = offsets[distinct[0]]
    cross = direction[0] * offsets[:, 1] - direction[1] * offsets[:, 0]
    return not np.any(cross)


def _collinear_radius_squared(points):
    """Return r^2 (px^2) for points on one line: a quarter of the squared span."""
    order = np.lexsort((points[:, 1], points[:, 0]))
    span = points[order[-1]] - points[order[0]]
    return float(span @ span) / 4.0


@lru_cache(maxsize=MAX_HULL_FOR_ONE_PASS + 1)
def _triples(n_points):
    """Return every index triple i < j < k below ``n_points`` as a (3, t) array."""
    return np.array(list(itertools.combinations(range(n_points), 3)), dtype=np.int64).T


def _triangle_radius_squared(a, b, c):
    """Compute r^2 of the minimal enclosing circle of each triangle (a[t], b[t], c[t]).

    For a right or obtuse triangle the circle has the longest side as its
    diameter, otherwise it is the circumcircle, with
    ``R^2 = |ab|^2 |bc|^2 |ca|^2 / (4 cross^2)``. Squared sides and the
    cross product are exact integers, so the only rounding is in the final
    product and division.
    """
    ab = b - a
    ac = c - a
    bc = c - b

    side_a = np.einsum("ij,ij->i", bc, bc)
    side_b = np.einsum("ij,ij->i", ac, ac)
    side_c = np.einsum("ij,ij->i", ab, ab)
    cross = ab[:, 0] * ac[:, 1] - ab[:, 1] * ac[:, 0]

    longest = np.maximum(np.maximum(side_a, side_b), side_c)
    right_or_obtuse = 2 * longest >= side_a + side_b + side_c

    with np.errstate(divide="ignore", invalid="ignore"):
        circumradius_sq = side_a.astype(np.float64) * side_b * side_c / (4.0 * cross.astype(np.float64) ** 2)
    return np.where(right_or_obtuse, longest / 4.0, circumradius_sq)


def _hull_radius_squared(vertices):
    """Return r^2 (px^2) of the minimal enclosing circle of convex hull vertices.

    The minimal enclosing circle of a set is fixed by at most three of its
    points, and no subset needs a larger circle than the whole set. Its
    radius is therefore the largest radius of the minimal enclosing circles
    of all vertex triples, which needs no search and no containment test.
    """
    n_vertices = len(vertices)

    if n_vertices <= MAX_HULL_FOR_ONE_PASS:
        first, second, third = _triples(n_vertices)
        return float(_triangle_radius_squared(vertices[first], vertices[second], vertices[third]).max())

    best = 0.0
    for first in range(n_vertices - 2):
        second, third = np.triu_indices(n_vertices - first - 1, k=1)
        second = second + first + 1
        third = third + first + 1
        anchor = np.broadcast_to(vertices[first], (len(second), 2))
        best = max(best, float(_triangle_radius_squared(anchor, vertices[second], vertices[third]).max()))
    return best


def enclosing_radius_squared(points):
    """Compute the squared radius of the minimal enclosing circle of integer points.

    Parameters
    ----------
    points : (k, 2) array_like of int
        Pixel centres as (row, col), in px. Repeated points are allowed.

    Returns
    -------
    float
        r^2 in px^2. It is 0 for a single point and a quarter of the squared
        length for collinear points.
    """
    points = np.asarray(points, dtype=np.int64)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) == 0:
        raise ValueError(f"points must have shape (k, 2) with k >= 1, got {points.shape}")

    if _are_collinear(points):
        return _collinear_radius_squared(points)

    # Qhull works in floating point and may drop a vertex that lies within
    # its round-off distance of an edge. For scan-sized coordinates that is
    # about 1e-12 px (an estimate), so r changes by at most as much.
    vertices = points[ConvexHull(points).vertices]
    return _hull_radius_squared(vertices)


def _circle_ratio(area, radius_squared):
    circle_area = np.pi * radius_squared
    return (circle_area - area) / circle_area


def circle_scores(markers, areas, indices):
    """Compute how much of its minimal enclosing circle each impurity leaves empty.

    The score of a significant impurity is ``(pi r^2 - A) / (pi r^2)``, with
    ``A`` its area and ``r`` the radius of the minimal enclosing circle of
    its pixel centres. Round impurities score near 0, thin or branched ones
    near 1. Small impurities score below 0, because the circle passes
    through pixel centres while the area counts whole pixels: a 2x2 block
    has ``r = sqrt(2) / 2`` and scores ``1 - 8 / pi = -1.5465``.

    Parameters
    ----------
    markers : (H, W) int ndarray
        Watershed label image, impurity id ``i`` labelled ``i + 2``.
    areas : (n,) array_like
        Area of each impurity id in px^2, as counted in ``markers``.
    indices : (m,) int ndarray
        Ids of the significant impurities, which must have at least 2 pixels
        that are not all the same point.

    Returns
    -------
    (n,) float64 ndarray
        Score per impurity id, ``inf`` for ids not in ``indices``.

    Raises
    ------
    ValueError
        If an argument has the wrong shape or type, an index is out of range,
        or an impurity in ``indices`` has no pixel or a single pixel in
        ``markers``.
    """
    markers = _validate_markers(markers)
    areas, indices = _validate_areas_indices(areas, indices)

    impurity_labels, slices = _impurity_slices(markers, len(areas))
    scores = np.full(len(areas), np.inf, dtype=np.float64)

    for impurity_id in indices:
        box = slices[impurity_id]
        if box is None:
            raise ValueError(f"indices contains impurity id {impurity_id}, which has no pixel in markers")

        mask = impurity_labels[box] == impurity_id + 1
        points = _row_extremes(mask, box[0].start, box[1].start)
        radius_squared = enclosing_radius_squared(points)

        if radius_squared == 0:
            raise ValueError(
                f"impurity id {impurity_id} is a single pixel, so its circle ratio is undefined; "
                "pass only significant indices (area > 3 px^2)"
            )
        scores[impurity_id] = _circle_ratio(areas[impurity_id], radius_squared)

    return scores


# ---------------------------------------------------------------------------
# Normalised crops
# ---------------------------------------------------------------------------


def _impurity_window(markers, label, row_start, row_stop, col_start, col_stop, gray=None):
    """Draw one impurity on white inside a window of the label image.

    The impurity's pixels are black, or their gray level in ``gray`` when
    it is given. Rows or columns of the window outside the image are white.
    """
    height, width = markers.shape
    window = np.full((row_stop - row_start, col_stop - col_start), BACKGROUND_VALUE, dtype=np.uint8)

    top, bottom = max(row_start, 0), min(row_stop, height)
    left, right = max(col_start, 0), min(col_stop, width)
    if top >= bottom or left >= right:
        return window

    inside = markers[top:bottom, left:right] == label
    target = window[top - row_start : bottom - row_start, left - col_start : right - col_start]
    if gray is None:
        target[inside] = IMPURITY_VALUE
    else:
        target[inside] = gray[top:bottom, left:right][inside]
    return window


def _validate_image(image, markers):
    if image is None:
        return None
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.shape[:2] != markers.shape or image.ndim not in (2, 3):
        raise ValueError(
            f"image must be a uint8 gray or BGR image of shape {markers.shape} like markers, "
            f"got shape {image.shape} and dtype {image.dtype}"
        )
    if image.ndim == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return image


def scaled_size(box_height, box_width):
    """Compute the size of a box after scaling its longer side to 80 px.

    Parameters
    ----------
    box_height, box_width : int
        ``rmax - rmin`` and ``cmax - cmin`` of the padded box, in px.

    Returns
    -------
    height, width : int
        Scaled size in px, truncated toward zero exactly as
        ``int(side * min(80 / box_height, 80 / box_width))`` in float64.
    """
    factor = min(SCALED_SIZE / box_height, SCALED_SIZE / box_width)
    return int(box_height * factor), int(box_width * factor)


def _centre_on_canvas(scaled):
    height, width = scaled.shape
    canvas = np.full((CROP_SIZE, CROP_SIZE), BACKGROUND_VALUE, dtype=np.uint8)
    top = (CROP_SIZE - height) // 2
    left = (CROP_SIZE - width) // 2
    canvas[top : top + height, left : left + width] = scaled
    return canvas


def impurity_crops(markers, boxes, indices, image=None):
    """Draw each impurity on white, scaled and centred on a 100x100 canvas.

    For impurity ``i`` with padded box ``(rmin, rmax, cmin, cmax)`` the
    window ``[rmin:rmax, cmin:cmax]`` of the label image is drawn with the
    impurity's pixels black (0), or in their scan gray level when ``image``
    is given, and all others white (255). Because the box is padded by one
    pixel on each side and the stop is exclusive, the window has one white
    row and column before the impurity and none after.
    The window is resized with ``cv2.resize`` (bilinear) by
    ``f = min(80 / dr, 80 / dc)`` to ``(int(dr * f), int(dc * f))`` px,
    with ``dr = rmax - rmin`` and ``dc = cmax - cmin``, and placed at row
    ``(100 - h) // 2`` and column ``(100 - w) // 2`` of a white canvas.

    Parameters
    ----------
    markers : (H, W) int ndarray
        Watershed label image, impurity id ``i`` labelled ``i + 2``.
    boxes : (n, 4) array_like
        Padded boxes ``(rmin - 1, rmax + 1, cmin - 1, cmax + 1)`` in px, as
        returned by :func:`impurity_extract.measure_impurities`. Window
        rows or columns outside the image are drawn white.
    indices : (m,) array_like of int
        Ids of the impurities to crop.
    image : (H, W) or (H, W, 3) uint8 ndarray, optional
        The scan, gray or BGR. When given, the impurity's pixels keep their
        gray level in the scan instead of black, as the public MLography
        code draws them. Pixels that the watershed gave to the impurity but
        that are light in the scan then stay light.

    Returns
    -------
    crop_ids : (N,) int64 ndarray
        Ids of the cropped impurities, in the order of ``indices``. Ids whose
        scaled height or width truncates to 0 px (padded boxes more than 80
        times longer than wide) are left out.
    crops : (N, 100, 100) uint8 ndarray
        The crops.
    """
    markers = _validate_markers(markers)
    indices = np.asarray(indices)
    if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
        raise ValueError(f"indices must be a 1-D integer array of impurity ids, got shape {indices.shape}")
    indices = indices.astype(np.int64)
    if indices.size and indices.min() < 0:
        raise ValueError(f"indices must not be negative, got {indices.min()}")
    int_boxes = _validate_boxes(boxes, indices)
    gray = _validate_image(image, markers)

    crop_ids = []
    crops = []
    for impurity_id, (rmin, rmax, cmin, cmax) in zip(indices, int_boxes):
        height, width = scaled_size(rmax - rmin, cmax - cmin)
        if height == 0 or width == 0:
            logger.debug("impurity %d: box %dx%d px scales to 0 px, no crop", impurity_id, rmax - rmin, cmax - cmin)
            continue

        window = _impurity_window(markers, impurity_id + FIRST_IMPURITY_LABEL, rmin, rmax, cmin, cmax, gray)
        scaled = cv2.resize(window, (width, height))
        crop_ids.append(impurity_id)
        crops.append(_centre_on_canvas(scaled))

    if not crops:
        return np.empty(0, dtype=np.int64), np.empty((0, CROP_SIZE, CROP_SIZE), dtype=np.uint8)
    return np.asarray(crop_ids, dtype=np.int64), np.stack(crops)


def crop_file_name(scan_name, impurity_id, prefix=""):
    """Return ``<prefix><scan_name>_impurity_<id>.png``."""
    return f"{prefix}{scan_name}_impurity_{int(impurity_id)}.png"


def write_crops(crop_ids, crops, folder, scan_name):
    """Write each crop as ``<folder>/<scan_name>_impurity_<id>.png``.

    Every file is written atomically, so an interrupted run leaves no
    partial PNG.

    Parameters
    ----------
    crop_ids : (N,) array_like of int
        Impurity id of each crop.
    crops : (N, 100, 100) uint8 ndarray
        Crops from :func:`impurity_crops`.
    folder : str or os.PathLike
        Output folder; created when missing.
    scan_name : str
        Scan file name without folder and extension.

    Returns
    -------
    list of str
        Paths of the written files.
    """
    crop_ids = np.asarray(crop_ids)
    crops = np.asarray(crops)
    if crops.ndim != 3 or crops.shape[1:] != (CROP_SIZE, CROP_SIZE) or crops.dtype != np.uint8:
        raise ValueError(f"crops must be a (N, 100, 100) uint8 array, got {crops.shape} {crops.dtype}")
    if crop_ids.shape != (len(crops),):
        raise ValueError(f"crop_ids must have shape ({len(crops)},) to match crops, got {crop_ids.shape}")
    if not scan_name or os.sep in scan_name:
        raise ValueError(f"scan_name must be a non-empty file stem without a folder, got {scan_name!r}")

    folder = atomic_io.ensure_dir(folder)
    paths = []
    for impurity_id, crop in zip(crop_ids, crops):
        path = os.path.join(folder, crop_file_name(scan_name, impurity_id))
        atomic_io.write_png(path, crop)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------
# Training data for the shape autoencoder
# ---------------------------------------------------------------------------


def _validate_training_options(min_area, normal_max_ratio, anomaly_min_ratio):
    for name, value in (
        ("min_area", min_area),
        ("normal_max_ratio", normal_max_ratio),
        ("anomaly_min_ratio", anomaly_min_ratio),
    ):
        if isinstance(value, bool) or not np.isscalar(value) or not np.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if normal_max_ratio > anomaly_min_ratio:
        raise ValueError(
            f"normal_max_ratio ({normal_max_ratio}) must not exceed anomaly_min_ratio "
            f"({anomaly_min_ratio}), or an impurity could fall in both classes"
        )


def _write_training_crops(extraction, scan_name, class_dirs, options):
    """Write the crops of one scan into the class folders and return the count per class."""
    min_area, normal_max_ratio, anomaly_min_ratio, scan_gray_levels = options
    ratios = circle_scores(extraction.markers, extraction.areas, extraction.indices)

    large = extraction.indices[extraction.areas[extraction.indices] > min_area]
    normal = large[ratios[large] <= normal_max_ratio]
    anomaly = large[ratios[large] > anomaly_min_ratio]

    counts = {}
    for class_name, class_ids in (("normal", normal), ("anomaly", anomaly)):
        image = extraction.image if scan_gray_levels else None
        crop_ids, crops = impurity_crops(extraction.markers, extraction.boxes, class_ids, image)
        for impurity_id, crop in zip(crop_ids, crops):
            prefix = str(float(ratios[impurity_id]))
            path = os.path.join(class_dirs[class_name], crop_file_name(scan_name, impurity_id, prefix))
            atomic_io.write_png(path, crop)
        counts[class_name] = len(crop_ids)
    return counts


def prepare_training_data(
    scan_paths,
    min_threshold,
    rescaled_dir,
    min_area=50,
    normal_max_ratio=0.3,
    anomaly_min_ratio=0.55,
    scan_gray_levels=False,
):
    """Write crops of round and of irregular impurities as autoencoder training data.

    For every scan, impurities with an area above ``min_area`` are cropped
    with :func:`impurity_crops`. Those with a circle ratio
    (:func:`circle_scores`) of at most ``normal_max_ratio`` go to
    ``<rescaled_dir>/normal/``, those above ``anomaly_min_ratio`` to
    ``<rescaled_dir>/anomaly/``, and those in between are not written.
    Files are named ``<ratio><scan>_impurity_<id>.png``, with the ratio as
    ``str(float)`` and the scan as its file name without extension, for
    example ``0.1327...scan1tag-47_impurity_12.png``. The ratio of a
    compact impurity can be below 0 even above 50 px^2 (a digital disc of
    69 px^2 scores -0.098), so a name can start with ``-``.

    Parameters
    ----------
    scan_paths : iterable of str or os.PathLike
        Scans to read.
    min_threshold : int
        Gray level from 0 to 255 for :func:`impurity_extract.extract_impurities`.
    rescaled_dir : str or os.PathLike
        Output folder; ``normal`` and ``anomaly`` are created inside it.
    min_area : float
        Impurities with an area at most this, in px^2, are not written.
    normal_max_ratio : float
        Largest circle ratio of the normal class.
    anomaly_min_ratio : float
        The anomaly class takes circle ratios strictly above this.
    scan_gray_levels : bool
        Draw impurity pixels in their scan gray level, as the published
        MLography code does. The default, False, draws them black, which
        the main command and the shipped model use. See the ``image``
        argument of :func:`impurity_crops`. Crops for scoring must be drawn
        the same way as the training crops.

    Returns
    -------
    dict of str to int
        Number of crops written per class, under ``"normal"`` and
        ``"anomaly"``. Scans that cannot be read are logged as errors and
        skipped.
    """
    _validate_training_options(min_area, normal_max_ratio, anomaly_min_ratio)
    scan_paths = [os.fspath(path) for path in scan_paths]

    class_dirs = {name: atomic_io.ensure_dir(os.path.join(rescaled_dir, name)) for name in ("normal", "anomaly")}
    totals = {"normal": 0, "anomaly": 0}
    skipped = 0

    for scan_path in tqdm(scan_paths, desc="training crops", unit="scan"):
        try:
            extraction = extract_impurities(scan_path, min_threshold)
        except ScanReadError as error:
            logger.error("skipping scan: %s", error)
            skipped += 1
            continue

        scan_name = Path(scan_path).stem
        options = (min_area, normal_max_ratio, anomaly_min_ratio, scan_gray_levels)
        counts = _write_training_crops(extraction, scan_name, class_dirs, options)
        for class_name, count in counts.items():
            totals[class_name] += count
        logger.debug("%s: %d normal and %d anomaly crops", scan_name, counts["normal"], counts["anomaly"])

    logger.info(
        "wrote %d normal and %d anomaly crops from %d scans to %s (%d scans skipped)",
        totals["normal"],
        totals["anomaly"],
        len(scan_paths) - skipped,
        rescaled_dir,
        skipped,
    )
    return totals


# ---------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------


def _min_max(values):
    """Min-max normalise to 0..1; an empty or constant vector maps to all zeros."""
    if values.size == 0:
        return values.copy()
    low = values.min()
    span = values.max() - low
    if span == 0:
        return np.zeros_like(values)
    return (values - low) / span


def shape_scores(crop_ids, losses, n):
    """Turn autoencoder reconstruction losses into a 0..1 shape score per impurity.

    Parameters
    ----------
    crop_ids : (N,) array_like of int
        Impurity id of each loss, each id at most once.
    losses : (N,) array_like of float
        Reconstruction loss of each crop.
    n : int
        Number of impurity ids.

    Returns
    -------
    (n,) float64 ndarray
        The losses that are finite and above 0, min-max normalised to 0..1
        among themselves. Every other impurity, cropped or not, scores 0,
        and so does every impurity when those losses are all equal.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer count of impurities, got {n!r}")
    crop_ids = np.asarray(crop_ids)
    losses = np.asarray(losses, dtype=np.float64)

    if crop_ids.ndim != 1 or (crop_ids.size and not np.issubdtype(crop_ids.dtype, np.integer)):
        raise ValueError(f"crop_ids must be a 1-D integer array, got shape {crop_ids.shape}")
    if losses.shape != crop_ids.shape:
        raise ValueError(f"losses must have shape {crop_ids.shape} to match crop_ids, got {losses.shape}")
    if crop_ids.size and (crop_ids.min() < 0 or crop_ids.max() >= n):
        raise ValueError(f"crop_ids must lie in 0..{n - 1}, got {crop_ids.min()}..{crop_ids.max()}")
    if len(np.unique(crop_ids)) != len(crop_ids):
        raise ValueError("crop_ids must not contain an impurity id twice")

    usable = np.isfinite(losses) & (losses > 0)
    scores = np.zeros(int(n), dtype=np.float64)
    scores[crop_ids[usable]] = _min_max(losses[usable])
    return scores


def combined_scores(spatial, shape):
    """Combine spatial and shape scores into one 0..1 anomaly score.

    Parameters
    ----------
    spatial : (n,) array_like of float
        Spatial anomaly score per impurity id.
    shape : (n,) array_like of float
        Shape anomaly score per impurity id.

    Returns
    -------
    (n,) float64 ndarray
        ``spatial * shape``, min-max normalised to 0..1; all zeros when the
        product is constant.

    Raises
    ------
    ValueError
        If the shapes differ or a score is NaN or infinite.
    """
    spatial = np.asarray(spatial, dtype=np.float64)
    shape = np.asarray(shape, dtype=np.float64)

    if spatial.ndim != 1:
        raise ValueError(f"spatial must be a 1-D array, got shape {spatial.shape}")
    if shape.shape != spatial.shape:
        raise ValueError(f"shape must have shape {spatial.shape} to match spatial, got {shape.shape}")
    for name, values in (("spatial", spatial), ("shape", shape)):
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{name} must contain only finite scores, got NaN or infinity")

    product = spatial * shape
    if not np.all(np.isfinite(product)):
        raise ValueError("spatial * shape overflows float64; pass scores on a 0..1 scale")
    return _min_max(product)
