"""Weighted k-th nearest neighbour score of impurities.

A large impurity that lies far from its neighbourhood scores high. Distances
are gaps between padded bounding boxes, weighted by the fourth power of the
area ratio, so that a small neighbour counts as farther away than a large
one at the same gap.
"""

import logging

import numpy as np

logger = logging.getLogger(__name__)

#: Floor for distances and log arguments, as in the published method.
EPSILON = 1e-5

#: Exponent of the area ratio in the weighted distance.
AREA_RATIO_POWER = 4

#: Row chunk for pairwise work: 1024 rows x 20,000 columns of float64 is
#: 160 MB per temporary array.
CHUNK_ROWS = 1024


def box_gaps(boxes_a, boxes_b):
    """Compute the row and column gaps between two sets of boxes.

    Parameters
    ----------
    boxes_a : (n, 4) array_like
        Boxes as ``(rmin, rmax, cmin, cmax)`` in px.
    boxes_b : (m, 4) array_like
        Boxes in the same layout.

    Returns
    -------
    row_gap, col_gap : (n, m) float64 ndarray
        Gap in px along each axis: ``rmin_a - rmax_b`` when box b lies
        strictly above box a (``rmax_b < rmin_a``), ``rmin_b - rmax_a``
        when it lies strictly below, and 0 when the row ranges touch or
        overlap. Likewise for columns.
    """
    boxes_a = np.asarray(boxes_a, dtype=np.float64)
    boxes_b = np.asarray(boxes_b, dtype=np.float64)

    rmin_a, rmax_a, cmin_a, cmax_a = (boxes_a[:, i, None] for i in range(4))
    rmin_b, rmax_b, cmin_b, cmax_b = (boxes_b[None, :, i] for i in range(4))

    row_gap = np.maximum(np.maximum(rmin_a - rmax_b, rmin_b - rmax_a), 0.0)
    col_gap = np.maximum(np.maximum(cmin_a - cmax_b, cmin_b - cmax_a), 0.0)
    return row_gap, col_gap


def box_distances(boxes_a, boxes_b):
    """Compute the distance between every pair of boxes.

    The distance is 0 for boxes that overlap or touch, the gap along one
    axis when the boxes are separated along that axis only, and otherwise
    the Euclidean distance between the nearest corners.

    Parameters
    ----------
    boxes_a : (n, 4) array_like
        Boxes as ``(rmin, rmax, cmin, cmax)`` in px.
    boxes_b : (m, 4) array_like
        Boxes in the same layout.

    Returns
    -------
    (n, m) float64 ndarray
        Distances in px.
    """
    row_gap, col_gap = box_gaps(boxes_a, boxes_b)
    return np.sqrt(row_gap * row_gap + col_gap * col_gap)


def box_distance(box_a, box_b):
    """Compute the distance in px between two boxes; see :func:`box_distances`."""
    return float(box_distances(np.reshape(box_a, (1, 4)), np.reshape(box_b, (1, 4)))[0, 0])


def _kth_weighted_distances(boxes, areas, k):
    """Return, for each impurity, its k-th smallest weighted distance.

    The distances run over every other impurity, so ``k`` counts from 1 and
    must be at most ``len(areas) - 1``.
    """
    n = len(areas)
    kth = np.empty(n, dtype=np.float64)

    for start in range(0, n, CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, n)
        rows = np.arange(start, stop)

        distances = box_distances(boxes[start:stop], boxes)
        np.maximum(distances, EPSILON, out=distances)

        ratio = areas[start:stop, None] / areas[None, :]
        weighted = ratio**AREA_RATIO_POWER * distances

        # The impurity itself must never count as its own neighbour.
        weighted[rows - start, rows] = np.inf

        kth[start:stop] = np.partition(weighted, k - 1, axis=1)[:, k - 1]

    return kth


def _min_max(values):
    """Min-max normalise to 0..1; a constant vector maps to all zeros."""
    low = values.min()
    span = values.max() - low
    if span == 0 or not np.isfinite(span):
        return np.zeros_like(values)
    return (values - low) / span


def _rescale(raw):
    """Log-transform the raw scores and rescale them to 0..1.

    Steps: exact zeros become 1e-5, natural log, min-max, subtract twice the
    population standard deviation, floor at 1e-5, min-max again.
    """
    values = np.where(raw == 0, EPSILON, raw)
    values = np.log(values)
    values = _min_max(values)
    values = values - 2.0 * values.std()
    values = np.maximum(values, EPSILON)
    return _min_max(values)


def _validate_k_list(k_list):
    k_values = [k_list] if np.isscalar(k_list) else list(k_list)
    if not k_values:
        raise ValueError("k_list must contain at least one k, got an empty list")
    for k in k_values:
        if isinstance(k, bool) or int(k) != k or k <= 0:
            raise ValueError(f"k_list must contain positive integers, got k={k!r}")
    return [int(k) for k in k_values]


def _validate_inputs(boxes, areas, indices):
    boxes = np.asarray(boxes, dtype=np.float64)
    areas = np.asarray(areas, dtype=np.float64)
    indices = np.asarray(indices, dtype=np.int64)

    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (n, 4), got {boxes.shape}")
    if areas.shape != (len(boxes),):
        raise ValueError(f"areas must have shape ({len(boxes)},) to match boxes, got {areas.shape}")
    if indices.size and (indices.min() < 0 or indices.max() >= len(areas)):
        raise ValueError(f"indices must lie in 0..{len(areas) - 1}, got {indices.min()}..{indices.max()}")
    if indices.size and np.any(areas[indices] <= 0):
        raise ValueError("indices must name impurities with a positive area")
    return boxes, areas, indices


def weighted_kth_nn(boxes, areas, indices, k_list):
    """Compute the weighted k-th nearest neighbour score of each impurity.

    For significant impurity ``i`` and every other significant impurity
    ``j``, the weighted distance is ``w_ij = (A_i / A_j)**4 * max(d_ij,
    1e-5)``, with ``d_ij`` the distance between the padded boxes
    (:func:`box_distances`). The raw score is ``A_i * w_k**2``, with
    ``w_k`` the k-th smallest ``w_ij``. Raw scores are log-transformed and
    rescaled to 0..1 over the significant impurities.

    Parameters
    ----------
    boxes : (n, 4) array_like
        Padded bounding boxes ``(rmin, rmax, cmin, cmax)`` in px.
    areas : (n,) array_like
        Impurity areas in px^2.
    indices : (m,) array_like of int
        Ids of the significant impurities; only these are scored and only
        these count as neighbours.
    k_list : int or sequence of int
        The neighbour ranks k, each at least 1.

    Returns
    -------
    dict of int to (n,) float64 ndarray
        Score per k, from 0 to 1 at the significant ids and 0 elsewhere.
        When there are fewer than ``k + 1`` significant impurities,
        ``k = m - 1`` is used and a warning is logged. With 0 or 1
        significant impurities, or when all raw scores are equal, every
        score is 0.
    """
    k_values = _validate_k_list(k_list)
    boxes, areas, indices = _validate_inputs(boxes, areas, indices)

    n = len(areas)
    m = len(indices)
    significant_boxes = boxes[indices]
    significant_areas = areas[indices]

    scores = {}
    for k in k_values:
        score = np.zeros(n, dtype=np.float64)

        if m < 2:
            logger.warning("%d significant impurities: every spatial score for k=%d is 0", m, k)
            scores[k] = score
            continue

        used_k = k
        if m < k + 1:
            used_k = m - 1
            logger.warning(
                "k=%d requested but only %d significant impurities: using k=%d", k, m, used_k
            )

        kth = _kth_weighted_distances(significant_boxes, significant_areas, used_k)
        raw = significant_areas * kth**2

        score[indices] = _rescale(raw)
        top = score.max()
        if top > 0:
            score = score / top
        scores[k] = score

    return scores
