"""Plots of per-impurity scores drawn over the watershed label image.

Colouring goes through a lookup table indexed by label, so one plot costs
one array indexing pass over the label image, whatever the impurity count.
Large scans are reduced with area averaging to the figure's pixel size
before matplotlib draws them, which keeps a plot of a 3,400 x 2,500 px scan
well under a second.
"""

import os

import cv2
import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

import atomic_io
from impurity_extract import FIRST_IMPURITY_LABEL

#: Long side of the drawn scan in the saved figure, in px.
PLOT_LONG_SIDE_PX = 1600

#: Resolution of saved figures, in dots per inch.
PLOT_DPI = 100

WHITE = np.array([1.0, 1.0, 1.0])


def colour_by_id(markers, id_colours, background=WHITE):
    """Paint every impurity of a label image with the colour of its id.

    Parameters
    ----------
    markers : (H, W) int32 ndarray
        Watershed label image: -1 boundaries, 1 background, ``i + 2`` for
        impurity id ``i``.
    id_colours : (n, 3) float ndarray
        RGB colour from 0 to 1 for each impurity id.
    background : (3,) float ndarray
        RGB colour of the background and of the watershed boundaries.

    Returns
    -------
    (H, W, 3) uint8 ndarray
        The painted RGB image, 0 to 255. Eight bits keep a full scan at a
        quarter of the memory of float32.
    """
    id_colours = _to_uint8(np.asarray(id_colours, dtype=np.float64).reshape(-1, 3))
    n_ids = len(id_colours)

    # Row 0 of the table serves label -1, row 1 label 0 (never left by the
    # watershed), row 2 the background label 1, and row i + 3 impurity id i.
    table = np.empty((n_ids + FIRST_IMPURITY_LABEL + 1, 3), dtype=np.uint8)
    table[: FIRST_IMPURITY_LABEL + 1] = _to_uint8(np.asarray(background, dtype=np.float64))
    table[FIRST_IMPURITY_LABEL + 1 :] = id_colours

    return table[markers + 1]


def _reduce_for_display(rgb):
    height, width = rgb.shape[:2]
    scale = PLOT_LONG_SIDE_PX / max(height, width)
    if scale >= 1.0:
        return rgb
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def draw_image_figure(rgb, title, colormap=None, colorbar_label=None, colorbar_ticks=None):
    """Draw an RGB image in a figure with a title and an optional colorbar.

    The figure is a bare :class:`matplotlib.figure.Figure`, which renders
    with Agg and never opens a window.

    Parameters
    ----------
    rgb : (H, W, 3) ndarray
        Image, float from 0 to 1 or uint8.
    title : str
        Figure title.
    colormap : str or None
        Name of the colormap that the colorbar shows; no colorbar if None.
    colorbar_label : str or None
        Label of the colorbar, which runs from 0 to 1.
    colorbar_ticks : sequence of float or None
        Tick positions of the colorbar; matplotlib chooses them if None.

    Returns
    -------
    matplotlib.figure.Figure
    """
    display = _to_uint8(_reduce_for_display(rgb))
    height, width = display.shape[:2]

    # The scan is placed pixel for pixel with figimage, and the other parts
    # at fixed positions in px. Resampling through imshow and a layout
    # engine took about 4 times longer for a full scan.
    margin, title_height, colorbar_width = 10, 40, 110
    figure_width = width + 2 * margin + (colorbar_width if colormap is not None else 0)
    figure_height = height + 2 * margin + title_height
    figure = Figure(figsize=(figure_width / PLOT_DPI, figure_height / PLOT_DPI), dpi=PLOT_DPI)

    figure.figimage(display, xo=margin, yo=margin, origin="upper")
    figure.text(
        (margin + width / 2) / figure_width,
        1 - (title_height / 2) / figure_height,
        title,
        ha="center",
        va="center",
        fontsize="large",
    )

    if colormap is not None:
        colorbar_axes = figure.add_axes(
            [(width + 2 * margin) / figure_width, margin / figure_height, 20 / figure_width, height / figure_height]
        )
        mappable = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=colormap)
        colorbar = figure.colorbar(mappable, cax=colorbar_axes, ticks=colorbar_ticks)
        if colorbar_label:
            colorbar.set_label(colorbar_label)
    return figure


def _to_uint8(image):
    if image.dtype == np.uint8:
        return image
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def save_figure(path, figure):
    """Save a figure atomically, as PNG with fast compression when ``path`` ends in .png.

    Compression level 1 writes a plot of a full scan about 3 times faster
    than matplotlib's default level 6, for a file about 12 % larger.
    """
    options = {"dpi": PLOT_DPI}
    if os.fspath(path).lower().endswith(".png"):
        options["pil_kwargs"] = {"compress_level": 1}
    atomic_io.save_figure(os.fspath(path), figure, **options)


def save_score_plot(markers, scores, path, title, colorbar_label="score"):
    """Save a plot of the impurities coloured by score with jet on white.

    Parameters
    ----------
    markers : (H, W) int32 ndarray
        Watershed label image.
    scores : (n,) float ndarray
        Score of each impurity id, from 0 to 1.
    path : str or os.PathLike
        PNG file to write; written atomically.
    title : str
        Figure title.
    colorbar_label : str
        Label of the colorbar, which runs from 0 to 1.
    """
    scores = np.clip(np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0), 0.0, 1.0)
    id_colours = matplotlib.colormaps["jet"](scores)[:, :3]
    rgb = colour_by_id(markers, id_colours)

    figure = draw_image_figure(rgb, title, colormap="jet", colorbar_label=colorbar_label)
    save_figure(path, figure)
