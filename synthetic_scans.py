"""Generate seeded synthetic metallographic scans with planted anomalies.

A synthetic scan is an 8-bit grayscale image: a light, slightly shaded and
speckled background (gray levels 235 to 255) with dark impurities (gray
levels 0 to 20) drawn on it. Most impurities are small round dots, placed in
loose chains and at random. Planted among them are known anomalies: large
isolated impurities, elongated and cross-shaped impurities, and one dense
patch of large irregular impurities.

Every impurity keeps a gap of at least ``MIN_GAP_PX`` to every other one, so
the watershed of :mod:`impurity_extract` at ``min_threshold=30`` returns each
one as a separate impurity.

Every random value comes from one generator seeded with ``seed``, so a change
to the order of the draws changes every scan. Remake the examples in
``examples/`` after such a change.

Run ``python synthetic_scans.py --output_dir=examples --count=3 --seed=1`` to
write ``synthetic_<n>.png`` and ``synthetic_<n>_truth.json`` for n = 1..3.
"""

import logging
import os
from dataclasses import dataclass

import cv2
import numpy as np
from absl import app, flags

from atomic_io import write_json, write_png
from impurity_extract import FIRST_IMPURITY_LABEL

logger = logging.getLogger(__name__)

#: Kinds of planted anomalies, as written in the truth files.
LARGE_ISOLATED = "large_isolated"
ELONGATED = "elongated"
CROSS = "cross"
DENSE_PATCH_MEMBER = "dense_patch_member"

#: Kind of the ordinary small dots, which are not anomalies.
DOT = "dot"

#: Minimum gap between the drawn pixels of two impurities, in px. A 3x3
#: closing bridges gaps of up to 2 px (2.8 px along a diagonal), so 6 px
#: leaves a safe margin.
MIN_GAP_PX = 6

#: Free space around each large isolated impurity, in px.
ISOLATION_PX = 60

#: Free space around each elongated or cross-shaped impurity, in px.
SHAPE_CLEARANCE_PX = 12

#: Minimum distance from any impurity pixel to the image border, in px.
BORDER_MARGIN_PX = 10

#: Radius of the disc that contains the dense patch, in px.
PATCH_RADIUS_PX = 80

#: Highest gray level of an impurity pixel.
IMPURITY_MAX_GRAY = 20

#: Range of background gray levels.
BACKGROUND_MIN_GRAY = 235
BACKGROUND_MAX_GRAY = 255

#: Mean background gray level before shading and speckle.
BACKGROUND_MEAN_GRAY = 248

#: Fraction of background pixels that get speckle noise.
SPECKLE_FRACTION = 0.03

#: Largest speckle offset from the shaded background, in gray levels.
SPECKLE_MAX_OFFSET = 6

#: Fraction of the dots that are placed in chains. The others are scattered.
CHAIN_FRACTION = 0.6

#: Smallest accepted image height and width, in px.
MIN_SIZE_PX = 400

#: Candidate positions tried per anomaly and for the dense patch before
#: generation fails.
PLACEMENT_ATTEMPTS = 2000

#: Candidate positions tried per scattered dot before it is skipped.
DOT_ATTEMPTS = 50


@dataclass
class _Shape:
    """One impurity with its polygon, kind and placement constraints."""

    kind: str
    centre: tuple  # (row, col) in px, an impurity pixel
    polygon: np.ndarray  # (k, 2) int32 vertices as (x, y) = (col, row)
    radius: float  # distance from the centre that covers every pixel, in px
    clearance: float  # free space required around the impurity, in px


class _Layout:
    """Placed impurities and a check that a new one keeps its gaps."""

    def __init__(self, height, width):
        self.height = height
        self.width = width
        self.centres = np.empty((0, 2), dtype=np.float64)
        self.radii = np.empty(0, dtype=np.float64)
        self.clearances = np.empty(0, dtype=np.float64)
        self.shapes = []

    def fits(self, centre, radius, clearance=0.0):
        """Check that a disc at ``centre`` stays inside the margins and away from the others."""
        row, col = centre
        reach = radius + BORDER_MARGIN_PX
        if not (reach <= row < self.height - reach and reach <= col < self.width - reach):
            return False
        if not len(self.radii):
            return True

        distances = np.hypot(self.centres[:, 0] - row, self.centres[:, 1] - col)
        gaps = np.maximum(np.maximum(self.clearances, clearance), MIN_GAP_PX)
        return bool(np.all(distances >= self.radii + radius + gaps))

    def reserve(self, centre, radius, clearance):
        """Block a disc for later placements without drawing anything."""
        self.centres = np.vstack([self.centres, np.asarray(centre, dtype=np.float64)])
        self.radii = np.append(self.radii, radius)
        self.clearances = np.append(self.clearances, clearance)

    def add(self, shape):
        """Block the disc of ``shape`` and keep the shape for drawing."""
        self.reserve(shape.centre, shape.radius, shape.clearance)
        self.shapes.append(shape)


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def _bounding_radius(vertices):
    """Return the radius in px of a disc around the origin that covers the rasterised polygon."""
    # One extra pixel covers rounding and the rasterised outline.
    return float(np.hypot(vertices[:, 0], vertices[:, 1]).max()) + 1.0


def _polygon_shape(kind, vertices, centre, clearance):
    """Build a shape from float vertices ``(x, y)`` relative to the centre."""
    row, col = centre
    polygon = np.round(vertices + (col, row)).astype(np.int32)
    radius = _bounding_radius(vertices)
    centre = (int(row), int(col))
    return _Shape(kind=kind, centre=centre, polygon=polygon, radius=radius, clearance=clearance)


def _ellipse_vertices(semi_major, semi_minor, angle_deg):
    vertices = cv2.ellipse2Poly((0, 0), (int(semi_major), int(semi_minor)), int(angle_deg), 0, 360, 10)
    return vertices.astype(np.float64)


def _blob_vertices(rng, radius, jitter, vertex_count):
    """Return a star-shaped polygon around the origin with radial and angular jitter.

    Each vertex stays within a third of a step of its evenly spaced angle, so
    no angular gap reaches pi and the origin is always inside the polygon.
    """
    step = 2.0 * np.pi / vertex_count
    angles = step * (np.arange(vertex_count) + rng.uniform(-1.0 / 3.0, 1.0 / 3.0, vertex_count))
    radii = radius * (1.0 + rng.uniform(-jitter, jitter, vertex_count))
    return np.column_stack([radii * np.cos(angles), radii * np.sin(angles)])


def _cross_vertices(arm_px, half_width_px, angle_rad):
    """Return the 12 vertices of a plus sign, rotated by ``angle_rad``.

    Each arm reaches ``arm_px`` from the centre and is ``2 * half_width_px`` wide.
    """
    a, w = arm_px, half_width_px
    plus = np.array(
        [[w, w], [a, w], [a, -w], [w, -w], [w, -a], [-w, -a],
         [-w, -w], [-a, -w], [-a, w], [-w, w], [-w, a], [w, a]],
        dtype=np.float64,
    )
    cos, sin = np.cos(angle_rad), np.sin(angle_rad)
    rotation = np.array([[cos, -sin], [sin, cos]])
    return plus @ rotation.T


def _dot_vertices(rng):
    """Return a small, nearly round ellipse with semi-axes of 2-4 px, or 5-6 px for one dot in ten."""
    semi_major = rng.integers(5, 7) if rng.random() < 0.1 else rng.integers(2, 5)
    semi_minor = max(2, int(round(semi_major * rng.uniform(0.75, 1.0))))
    return _ellipse_vertices(semi_major, semi_minor, rng.uniform(0, 180))


def _anomaly_vertices(rng, kind):
    """Return the vertices of one planted anomaly of ``kind``, centred on the origin."""
    if kind == LARGE_ISOLATED:
        return _blob_vertices(rng, rng.uniform(14.0, 18.0), jitter=0.1, vertex_count=16)
    if kind == ELONGATED:
        return _ellipse_vertices(rng.integers(16, 23), rng.integers(3, 5), rng.uniform(0, 180))
    if kind == CROSS:
        return _cross_vertices(rng.uniform(15.0, 19.0), rng.uniform(1.4, 1.8), rng.uniform(0, np.pi / 2))
    if kind == DENSE_PATCH_MEMBER:
        radius = rng.uniform(7.0, 11.0)
        vertex_count = int(rng.integers(7, 11))
        return _blob_vertices(rng, radius, jitter=0.25, vertex_count=vertex_count)
    raise ValueError(f"kind must be one of the anomaly kinds, got {kind!r}")


def _random_centre(rng, height, width):
    return int(rng.integers(0, height)), int(rng.integers(0, width))


def _place_anomaly(rng, layout, kind, clearance):
    """Place one anomaly at a random free position, or raise RuntimeError if there is none."""
    vertices = _anomaly_vertices(rng, kind)
    radius = _bounding_radius(vertices)
    centre = _find_free_centre(rng, layout, radius, clearance, f"a {kind} impurity")
    layout.add(_polygon_shape(kind, vertices, centre, clearance))


def _find_free_centre(rng, layout, radius, clearance, description):
    """Draw random centres until a disc of ``radius`` px fits, or raise RuntimeError."""
    for _ in range(PLACEMENT_ATTEMPTS):
        centre = _random_centre(rng, layout.height, layout.width)
        if layout.fits(centre, radius, clearance):
            return centre
    raise RuntimeError(
        f"no free position for {description} in a {layout.height}x{layout.width} px scan. "
        "Use a larger scan or fewer anomalies."
    )


def _place_dense_patch(rng, layout, member_count):
    """Reserve a free disc and fill it with ``member_count`` large irregular impurities."""
    patch_centre = _find_free_centre(rng, layout, PATCH_RADIUS_PX, MIN_GAP_PX, "the dense patch")

    members = _Layout(layout.height, layout.width)
    for _ in range(member_count):
        _place_patch_member(rng, members, patch_centre)

    layout.reserve(patch_centre, PATCH_RADIUS_PX, MIN_GAP_PX)
    layout.shapes.extend(members.shapes)


def _place_patch_member(rng, members, patch_centre):
    vertices = _anomaly_vertices(rng, DENSE_PATCH_MEMBER)
    radius = _bounding_radius(vertices)
    spread = PATCH_RADIUS_PX - radius

    for _ in range(PLACEMENT_ATTEMPTS):
        offset = rng.uniform(-spread, spread, 2)
        if np.hypot(*offset) > spread:
            continue
        centre = (int(patch_centre[0] + offset[0]), int(patch_centre[1] + offset[1]))
        if members.fits(centre, radius):
            members.add(_polygon_shape(DENSE_PATCH_MEMBER, vertices, centre, MIN_GAP_PX))
            return
    raise RuntimeError(
        f"no free position for dense patch member {len(members.shapes) + 1}. "
        "Lower patch_member_count."
    )


def _try_add_dot(rng, layout, centre):
    vertices = _dot_vertices(rng)
    radius = _bounding_radius(vertices)
    if not layout.fits(centre, radius):
        return False
    layout.add(_polygon_shape(DOT, vertices, centre, MIN_GAP_PX))
    return True


def _place_chains(rng, layout, dot_count):
    """Place up to ``dot_count`` dots along random walks with 10-20 px steps.

    Each chain has 6 to 24 steps, and a step whose dot does not fit is
    skipped. At most ``dot_count`` chains are started, so the number of dots
    placed, which this returns, is lower than requested only when the scan is
    crowded.
    """
    placed = 0
    for _ in range(dot_count):
        if placed >= dot_count:
            break
        position = np.array(_random_centre(rng, layout.height, layout.width), dtype=np.float64)
        heading = rng.uniform(0.0, 2.0 * np.pi)

        for _ in range(min(int(rng.integers(6, 25)), dot_count - placed)):
            heading += rng.normal(0.0, 0.35)
            position += rng.uniform(10.0, 20.0) * np.array([np.sin(heading), np.cos(heading)])
            centre = (int(position[0]), int(position[1]))
            placed += _try_add_dot(rng, layout, centre)
    return placed


def _place_scattered(rng, layout, dot_count):
    """Place up to ``dot_count`` dots at uniform random positions and return the number placed."""
    placed = 0
    for _ in range(dot_count):
        for _ in range(DOT_ATTEMPTS):
            if _try_add_dot(rng, layout, _random_centre(rng, layout.height, layout.width)):
                placed += 1
                break
    return placed


def _layout_impurities(
    rng, height, width, dot_count, large_count, elongated_count, cross_count, patch_member_count
):
    """Place the anomalies first, then the dots in the space left over."""
    layout = _Layout(height, width)

    # The dense patch needs the largest free disc, so it goes first.
    if patch_member_count:
        _place_dense_patch(rng, layout, patch_member_count)
    for _ in range(large_count):
        _place_anomaly(rng, layout, LARGE_ISOLATED, ISOLATION_PX)
    for _ in range(elongated_count):
        _place_anomaly(rng, layout, ELONGATED, SHAPE_CLEARANCE_PX)
    for _ in range(cross_count):
        _place_anomaly(rng, layout, CROSS, SHAPE_CLEARANCE_PX)

    chain_target = int(round(dot_count * CHAIN_FRACTION))
    placed = _place_chains(rng, layout, chain_target)
    placed += _place_scattered(rng, layout, dot_count - placed)
    if placed < dot_count:
        logger.warning(
            "placed %d of %d dots because the scan has no free space for more. "
            "Lower dot_count or use a larger scan.",
            placed,
            dot_count,
        )
    return layout.shapes


def _draw_labels(shapes, height, width):
    """Rasterise the shapes into an int32 label image: shape i has label i + 1, the background 0."""
    labels = np.zeros((height, width), dtype=np.int32)
    for label, shape in enumerate(shapes, start=1):
        cv2.fillPoly(labels, [shape.polygon], label)

    drawn = np.unique(labels)
    if len(drawn) != len(shapes) + 1:
        hidden = len(shapes) + 1 - len(drawn)
        raise RuntimeError(f"{hidden} impurities were drawn over by others, so the placement gaps are wrong")
    return labels


def _background(rng, height, width):
    """Return a light background with smooth shading and sparse speckle, as uint8."""
    rows = np.arange(height, dtype=np.float64)[:, None]
    cols = np.arange(width, dtype=np.float64)[None, :]
    amplitudes = rng.uniform(1.0, 3.0, 2)
    periods = rng.uniform(200.0, 400.0, 2)
    phases = rng.uniform(0.0, 2.0 * np.pi, 2)
    shading = (
        BACKGROUND_MEAN_GRAY
        + amplitudes[0] * np.sin(cols / periods[0] + phases[0])
        + amplitudes[1] * np.sin(rows / periods[1] + phases[1])
    )
    background = np.round(shading)

    speckle = rng.random((height, width)) < SPECKLE_FRACTION
    offsets = rng.integers(-SPECKLE_MAX_OFFSET, SPECKLE_MAX_OFFSET + 1, int(speckle.sum()))
    background[speckle] += offsets

    return np.clip(background, BACKGROUND_MIN_GRAY, BACKGROUND_MAX_GRAY).astype(np.uint8)


def _render(rng, labels, shape_count):
    """Paint every labelled pixel with its impurity's gray level over the background."""
    image = _background(rng, *labels.shape)
    gray_levels = rng.integers(0, IMPURITY_MAX_GRAY + 1, shape_count + 1).astype(np.uint8)
    impurity = labels > 0
    image[impurity] = gray_levels[labels[impurity]]
    return image


def _inclusive_box(mask):
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])]


def _build_truth(shapes, labels, seed, height, width, parameters):
    """Describe every planted anomaly and the dense patch as a JSON-ready dict."""
    anomalies = []
    patch_mask = np.zeros_like(labels, dtype=bool)

    for label, shape in enumerate(shapes, start=1):
        if shape.kind == DOT:
            continue
        mask = labels == label
        if not mask[shape.centre]:
            raise RuntimeError(f"the centre {shape.centre} of a {shape.kind} impurity is not one of its pixels")
        anomalies.append({"kind": shape.kind, "centre": list(shape.centre), "box": _inclusive_box(mask)})
        if shape.kind == DENSE_PATCH_MEMBER:
            patch_mask |= mask

    truth = {
        "seed": seed,
        "height": height,
        "width": width,
        "parameters": parameters,
        "impurity_count": len(shapes),
        "placed_dot_count": sum(shape.kind == DOT for shape in shapes),
        "anomalies": anomalies,
    }
    if patch_mask.any():
        truth["dense_patch"] = {"box": _inclusive_box(patch_mask)}
    return truth


def generate_scan(
    seed,
    height=1200,
    width=1500,
    dot_count=420,
    large_count=3,
    elongated_count=2,
    cross_count=2,
    patch_member_count=8,
):
    """Generate a synthetic scan and the truth about its planted anomalies.

    Parameters
    ----------
    seed : int
        Seed of the random generator, at least 0. The same arguments always
        give the same image and truth with the same NumPy and OpenCV versions.
    height, width : int
        Image size in px, each at least 400.
    dot_count : int
        Number of small round dots (semi-axes 2-6 px) to place, about 60% in
        loose chains and the rest scattered. Fewer are placed, with a warning,
        when the scan runs out of free space.
    large_count : int
        Number of large isolated impurities (radius 14-18 px, with
        ``ISOLATION_PX`` of free space around them).
    elongated_count : int
        Number of thin ellipses (semi-axes 16-22 px by 3-4 px).
    cross_count : int
        Number of plus-shaped impurities (arms 15-19 px from the centre,
        bars about 4 px wide).
    patch_member_count : int
        Number of large irregular impurities (radius 7-11 px) packed into one
        disc of radius ``PATCH_RADIUS_PX``. 0 leaves out the dense patch.

    Returns
    -------
    image : (height, width) uint8 ndarray
        Grayscale scan: background 235-255, impurities 0-20.
    truth : dict
        JSON-ready description. ``seed``, ``height``, ``width`` and
        ``parameters`` (the other arguments) regenerate the scan.
        ``impurity_count`` and ``placed_dot_count`` are the numbers drawn.
        ``anomalies`` lists each planted anomaly as ``kind``,
        ``centre`` = ``[row, col]`` (one of its pixels, in px) and ``box`` =
        ``[row_min, row_max, col_min, col_max]`` (inclusive pixel limits,
        without the padding of :func:`impurity_extract.measure_impurities`).
        ``dense_patch`` has the ``box`` of all its members together, and is
        absent when ``patch_member_count`` is 0.

    Raises
    ------
    ValueError
        If an argument is not an integer or is below its minimum.
    RuntimeError
        If the anomalies do not fit in the scan.
    """
    seed = _check_int("seed", seed, 0)
    height = _check_int("height", height, MIN_SIZE_PX)
    width = _check_int("width", width, MIN_SIZE_PX)
    parameters = {
        "dot_count": _check_int("dot_count", dot_count, 0),
        "large_count": _check_int("large_count", large_count, 0),
        "elongated_count": _check_int("elongated_count", elongated_count, 0),
        "cross_count": _check_int("cross_count", cross_count, 0),
        "patch_member_count": _check_int("patch_member_count", patch_member_count, 0),
    }

    rng = np.random.default_rng(seed)
    shapes = _layout_impurities(rng, height, width, **parameters)
    labels = _draw_labels(shapes, height, width)
    image = _render(rng, labels, len(shapes))
    truth = _build_truth(shapes, labels, seed, height, width, parameters)

    logger.debug("seed %d: %d impurities, %d planted anomalies", seed, len(shapes), len(truth["anomalies"]))
    return image, truth


def generate_from_truth(truth):
    """Regenerate the scan that a truth dict from :func:`generate_scan` describes."""
    return generate_scan(truth["seed"], truth["height"], truth["width"], **truth["parameters"])


def match_truth(truth, extraction):
    """Find the extracted impurity id at the centre of each planted anomaly.

    Parameters
    ----------
    truth : dict
        Truth from :func:`generate_scan` or a truth file.
    extraction : impurity_extract.ImpurityExtraction
        Impurities extracted from the same scan.

    Returns
    -------
    (len(truth["anomalies"]),) int64 ndarray
        Impurity id per anomaly, in the order of ``truth["anomalies"]``,
        computed as ``markers[row, col] - 2``. -1 where the centre lies on
        the background or on a watershed boundary.

    Raises
    ------
    ValueError
        If ``truth`` lacks its size or anomalies, or its size differs from
        the extraction's label image.
    """
    for key in ("height", "width", "anomalies"):
        if key not in truth:
            raise ValueError(f"truth is missing the key {key!r}. Pass a dict from generate_scan or a truth file.")

    markers = extraction.markers
    if markers.shape != (truth["height"], truth["width"]):
        raise ValueError(
            f"truth describes a {truth['height']}x{truth['width']} px scan, but the extraction "
            f"is {markers.shape[0]}x{markers.shape[1]} px. Pass the extraction of the same scan."
        )

    if not truth["anomalies"]:
        return np.empty(0, dtype=np.int64)

    centres = np.array([anomaly["centre"] for anomaly in truth["anomalies"]], dtype=np.int64)
    labels = markers[centres[:, 0], centres[:, 1]].astype(np.int64)
    return np.where(labels >= FIRST_IMPURITY_LABEL, labels - FIRST_IMPURITY_LABEL, -1)


def scan_paths(output_dir, number):
    """Return the image and truth paths of example ``number`` in ``output_dir``."""
    stem = os.path.join(os.fspath(output_dir), f"synthetic_{number}")
    return f"{stem}.png", f"{stem}_truth.json"


def write_examples(output_dir, count, seed, height=1200, width=1500):
    """Generate ``count`` scans with seeds ``seed``, ``seed + 1``, ... and write them atomically.

    Scan ``n`` (from 1) goes to ``synthetic_<n>.png`` and its truth to
    ``synthetic_<n>_truth.json`` in ``output_dir``.

    Returns
    -------
    list of (str, str)
        Image and truth path of each scan.

    Raises
    ------
    ValueError
        If ``count`` is below 1 or a :func:`generate_scan` argument is invalid.
    """
    count = _check_int("count", count, 1)
    seed = _check_int("seed", seed, 0)

    written = []
    for number in range(1, count + 1):
        image, truth = generate_scan(seed + number - 1, height, width)
        image_path, truth_path = scan_paths(output_dir, number)
        write_png(image_path, image)
        write_json(truth_path, truth)
        logger.info(
            "wrote %s (seed %d, %d impurities, %d planted anomalies)",
            image_path, truth["seed"], truth["impurity_count"], len(truth["anomalies"]),
        )
        written.append((image_path, truth_path))
    return written


FLAGS = flags.FLAGS


def _define_flags():
    # Defined only when run as a script, so that importing this module never
    # clashes with flags of the same name in other modules.
    flags.DEFINE_string("output_dir", "examples", "Folder for synthetic_<n>.png and synthetic_<n>_truth.json.")
    flags.DEFINE_integer("count", 3, "Number of scans to generate.", lower_bound=1)
    flags.DEFINE_integer("seed", 1, "Seed of scan 1. Scan n uses seed + n - 1.", lower_bound=0)
    flags.DEFINE_integer("height", 1200, "Scan height in px.", lower_bound=MIN_SIZE_PX)
    flags.DEFINE_integer("width", 1500, "Scan width in px.", lower_bound=MIN_SIZE_PX)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}. Pass options as --name=value.")
    write_examples(FLAGS.output_dir, FLAGS.count, FLAGS.seed, FLAGS.height, FLAGS.width)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
