"""Per-scan pipeline of the main command and its outputs.

For one scan: extraction, spatial score for each k, circle ratio, shape
score and combined score, market clustering, then the impurity table, the
plots and the clusters log entry. The log entry is written last, so a scan
counts as finished only when every other output of it exists.
"""

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

import area_anomaly
import atomic_io
import score_plots
import shape_anomaly
from impurity_extract import FIRST_IMPURITY_LABEL, ScanReadError, extract_impurities
from spatial_anomaly import weighted_kth_nn

logger = logging.getLogger("mlography")

#: The k whose combined score feeds market clustering when it is in --k.
AREA_K = 50


@dataclass
class PipelineConfig:
    """Settings of one run of the main command; see its flags for meanings."""

    min_threshold: int = 0
    k_list: list = field(default_factory=lambda: [AREA_K])
    shape_anomaly: bool = True
    shape_loss: str = "reference"
    write_crops: bool = False
    area_clusters: int = 10
    reference_clustering: bool = False
    logs_dir: str = "./logs/"
    area_anomaly_dir: str = "./logs/area/"
    clusters_log: str = "./logs/area/clusters_scores.txt"
    plots_dir: str = "./logs/area/plots"
    ordered_clusters_scores: str = "./logs/area/ordered_clusters_scores.json"
    order_histogram_dir: str = "./logs/area/histograms"
    save_ordered_dir: str = "./logs/area/ordered"
    order_key: str = "weighted_area2_sum_mult_diameter_mult_amount"
    top_ranked: int = 50
    overwrite: bool = False

    @property
    def area_k(self):
        """The k whose combined score is clustered: 50 if requested, else the first k."""
        return AREA_K if AREA_K in self.k_list else self.k_list[0]


@dataclass
class RunSummary:
    """Scan counts of one detection run."""

    processed: int = 0
    skipped: int = 0
    failed: list = field(default_factory=list)


@dataclass
class ScanScores:
    """Every per-impurity score of one scan, each of shape (n,)."""

    spatial: dict
    circle: np.ndarray
    shape: np.ndarray = None
    combined: dict = None
    crops: tuple = None


def scan_name(path):
    """Return the scan name used in outputs: the file name without extension."""
    return os.path.splitext(os.path.basename(path))[0]


def table_path(config, name):
    """Path of the impurity table of a scan."""
    return os.path.join(config.logs_dir, name, "impurities.csv")


def load_shape_model(model_path):
    """Load the autoencoder, with a one-line error for a bad file."""
    import use_model

    started = time.perf_counter()
    model = use_model.load_model(model_path)
    logger.info("loaded shape model %s in %.1f s", model_path, time.perf_counter() - started)
    return model


# Scoring.


def compute_scores(extraction, config, model):
    """Compute the spatial, circle, shape and combined scores of one scan.

    Returns
    -------
    ScanScores
    """
    spatial = weighted_kth_nn(extraction.boxes, extraction.areas, extraction.indices, config.k_list)
    circle = shape_anomaly.circle_scores(extraction.markers, extraction.areas, extraction.indices)
    scores = ScanScores(spatial=spatial, circle=circle)

    if model is None:
        scores.combined = spatial
        return scores

    # The whole watershed label is drawn black, as in the shipped model's
    # training crops.
    crop_ids, crops = shape_anomaly.impurity_crops(extraction.markers, extraction.boxes, extraction.indices)
    losses = _reconstruction_losses(model, crops, config.shape_loss)
    scores.shape = shape_anomaly.shape_scores(crop_ids, losses, extraction.n_impurities)
    scores.combined = {k: shape_anomaly.combined_scores(spatial[k], scores.shape) for k in config.k_list}
    scores.crops = (crop_ids, crops)
    return scores


def _reconstruction_losses(model, crops, mode):
    import use_model

    return use_model.reconstruction_losses(model, crops, mode=mode)


# Outputs.


def centroids(markers, n_impurities):
    """Compute the centroid (row, column) in px of every impurity id.

    Ids with no pixels get NaN, which the table writes as an empty cell.
    """
    rows, cols = np.nonzero(markers >= FIRST_IMPURITY_LABEL)
    ids = markers[rows, cols].astype(np.int64) - FIRST_IMPURITY_LABEL

    counts = np.bincount(ids, minlength=n_impurities)[:n_impurities]
    row_sums = np.bincount(ids, weights=rows, minlength=n_impurities)[:n_impurities]
    col_sums = np.bincount(ids, weights=cols, minlength=n_impurities)[:n_impurities]

    with np.errstate(invalid="ignore", divide="ignore"):
        return row_sums / counts, col_sums / counts


def impurity_table(extraction, scores, clusters, config):
    """Build the impurity table of one scan, one row per impurity id.

    Columns: id, label, padded box (px), area (px^2), centroid (px),
    significant, spatial score per k, circle ratio, shape score and
    combined score per k (with the shape stage), and cluster name.

    A cell is empty (NaN when read back) only where the value is undefined.
    These are the box and centroid of an id that the watershed left with no
    pixels, the circle ratio of an impurity that is not significant, and the
    cluster of an impurity in no cluster. Score columns always contain a
    number from 0 to 1.
    """
    n = extraction.n_impurities
    boxes = extraction.boxes
    centroid_row, centroid_col = centroids(extraction.markers, n)
    significant = np.zeros(n, dtype=bool)
    significant[extraction.indices] = True
    has_pixels = np.asarray(extraction.areas) > 0

    columns = {
        "id": np.arange(n),
        "label": np.arange(n) + FIRST_IMPURITY_LABEL,
        "box_rmin": _int_column(boxes[:, 0], has_pixels),
        "box_rmax": _int_column(boxes[:, 1], has_pixels),
        "box_cmin": _int_column(boxes[:, 2], has_pixels),
        "box_cmax": _int_column(boxes[:, 3], has_pixels),
        "area_px": extraction.areas,
        "centroid_row": np.round(centroid_row, 3),
        "centroid_col": np.round(centroid_col, 3),
        "significant": significant,
    }
    for k in config.k_list:
        columns[f"spatial_k{k}"] = scores.spatial[k]
    # circle_scores returns inf for impurities that are not significant.
    columns["circle_ratio"] = np.where(significant, scores.circle, np.nan)
    if scores.shape is not None:
        columns["shape_score"] = scores.shape
        for k in config.k_list:
            columns[f"combined_k{k}"] = scores.combined[k]

    cluster_names = np.full(n, "", dtype=object)
    for cluster in clusters:
        cluster_names[list(cluster.impurities)] = cluster.name
    columns["cluster"] = cluster_names

    return pd.DataFrame(columns)


def _int_column(values, defined):
    """Integer column with an empty cell where ``defined`` is False."""
    return pd.Series(np.asarray(values).astype(np.int64), dtype="Int64").where(defined)


def write_score_plots(extraction, scores, config, scan_dir, name):
    """Write the spatial, shape and combined score plots of one scan."""
    markers = extraction.markers
    for k in config.k_list:
        score_plots.save_score_plot(
            markers,
            scores.spatial[k],
            os.path.join(scan_dir, f"spatial_anomaly_k{k}.png"),
            f"{name}: spatial anomaly (weighted k-th nearest neighbour, k={k})",
        )

    if scores.shape is None:
        return

    score_plots.save_score_plot(
        markers, scores.shape, os.path.join(scan_dir, "shape_anomaly.png"), f"{name}: shape anomaly"
    )
    for k in config.k_list:
        score_plots.save_score_plot(
            markers,
            scores.combined[k],
            os.path.join(scan_dir, f"shape_and_spatial_anomaly_k{k}.png"),
            f"{name}: shape and spatial anomaly, k={k}",
        )


def process_scan(path, config, model):
    """Run the whole pipeline on one scan and write its outputs.

    Returns
    -------
    int
        The number of impurity ids found.

    Raises
    ------
    ScanReadError
        If the scan cannot be read.
    """
    name = scan_name(path)
    scan_dir = atomic_io.ensure_dir(os.path.join(config.logs_dir, name))
    # Only the run that processes a scan writes into its folder.
    if atomic_io.remove_temporaries(scan_dir):
        logger.info("%s: removed partial files left by an interrupted run", name)

    extraction = extract_impurities(path, config.min_threshold)
    if len(extraction.indices) == 0:
        logger.info("%s: no significant impurity found at --min_threshold=%d", name, config.min_threshold)
    _warn_if_mostly_impurity(name, extraction, config.min_threshold)

    scores = compute_scores(extraction, config, model)
    area_scores = scores.combined[config.area_k]
    clusters = area_anomaly.market_clustering(
        extraction.boxes,
        extraction.areas,
        area_scores,
        k=config.area_clusters,
        reference=config.reference_clustering,
    )
    _warn_if_single_cluster(name, clusters, area_scores)

    atomic_io.write_csv(table_path(config, name), impurity_table(extraction, scores, clusters, config))
    write_score_plots(extraction, scores, config, scan_dir, name)
    if config.write_crops and scores.crops is not None:
        crop_ids, crops = scores.crops
        shape_anomaly.write_crops(crop_ids, crops, os.path.join(scan_dir, "crops"), name)

    plot_path = os.path.join(config.plots_dir, f"{name}.png")
    area_anomaly.plot_area_anomaly(extraction.markers, extraction.indices, clusters, plot_path)

    entry = area_anomaly.clusters_log_entry(name, plot_path, clusters, area_scores)
    area_anomaly.update_clusters_log(config.clusters_log, entry)
    return extraction.n_impurities


#: Share of the scan's pixels above which impurity pixels suggest an
#: inverted scan or a threshold that is too high.
MAX_IMPURITY_SHARE = 0.5


def _warn_if_mostly_impurity(name, extraction, min_threshold):
    share = float(np.sum(extraction.areas)) / extraction.markers.size
    if share > MAX_IMPURITY_SHARE:
        logger.warning(
            "%s: impurity pixels cover %.0f%% of the scan at --min_threshold=%d; check that the "
            "impurities are dark on a light background and that the threshold is below the background",
            name,
            100 * share,
            min_threshold,
        )


def _warn_if_single_cluster(name, clusters, area_scores):
    # NOTE: the default (documented-intent) rules make merges free and price
    # each impurity at its nearest member, so on the published scans every
    # scoring impurity ends in one cluster.
    n_scoring = int(np.count_nonzero(np.asarray(area_scores) > 0))
    if len(clusters) == 1 and n_scoring > 1 and len(clusters[0].impurities) == n_scoring:
        logger.warning(
            "%s: market clustering merged all %d scoring impurities into one cluster; "
            "--reference_clustering keeps the separate areas of the published method",
            name,
            n_scoring,
        )


def finished_scans(config):
    """Return the names of scans with a clusters log entry and an impurity table."""
    entries = area_anomaly.read_clusters_log(config.clusters_log)
    return {
        entry["scan_name"] for entry in entries if os.path.exists(table_path(config, entry["scan_name"]))
    }


def run_scans(scan_paths, config, model):
    """Process every scan, skipping finished ones unless ``config.overwrite``.

    A scan that cannot be read, or fails on invalid data, is logged and
    listed in the summary, and the other scans still run.

    Returns
    -------
    RunSummary
    """
    from tqdm import tqdm

    summary = RunSummary()
    finished = set() if config.overwrite else finished_scans(config)

    # The bar is drawn only on a terminal (disable=None), so logs stay clean.
    bar = tqdm(scan_paths, desc="scans", unit="scan", disable=None)
    with bar, _log_above_bar(bar):
        for path in bar:
            _run_one_scan(path, config, model, finished, summary)

    logger.info("%d scans processed, %d skipped as finished, %d failed", summary.processed, summary.skipped, len(summary.failed))
    return summary


def _run_one_scan(path, config, model, finished, summary):
    name = scan_name(path)
    if name in finished:
        logger.info("%s: results exist, skipped (pass --overwrite to redo it)", name)
        summary.skipped += 1
        return

    started = time.perf_counter()
    try:
        n_impurities = process_scan(path, config, model)
    except (ScanReadError, ValueError) as error:
        logger.error("%s: failed: %s", name, error)
        logger.debug("traceback of the failure of %s", name, exc_info=True)
        summary.failed.append(path)
        return

    logger.info("%s: %d impurities, %.1f s", name, n_impurities, time.perf_counter() - started)
    summary.processed += 1


class _BarSafeStream:
    """Stream that writes through ``tqdm.write``, which clears and redraws the bar."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        from tqdm import tqdm

        tqdm.write(text, file=self.stream, end="")

    def flush(self):
        self.stream.flush()


def _console_handlers():
    """Return the root logger's stream handlers that write to the console.

    absl's handler wraps a ``logging.StreamHandler`` in ``python_handler``.
    """
    handlers = []
    for handler in logging.getLogger().handlers:
        inner = getattr(handler, "python_handler", handler)
        if isinstance(inner, logging.StreamHandler) and inner.stream in (sys.stderr, sys.stdout):
            handlers.append(inner)
    return handlers


@contextlib.contextmanager
def _log_above_bar(bar):
    """Print console log lines above the progress bar instead of inside it."""
    handlers = [] if bar.disable else _console_handlers()
    originals = [handler.stream for handler in handlers]
    for handler in handlers:
        handler.setStream(_BarSafeStream(handler.stream))
    try:
        yield
    finally:
        for handler, original in zip(handlers, originals):
            handler.setStream(original)


# Ranking.


def rank_log(config):
    """Read the clusters log and rank its clusters by every order key.

    Returns
    -------
    entries : list of dict
        The clusters log.
    ordered : dict
        The ranking, as :func:`area_anomaly.order_clusters` returns it.
    """
    entries = _read_log_entries(config)
    return entries, area_anomaly.order_clusters(entries)


def order_log(config, ranking=None):
    """Write the ranking outputs of the clusters log.

    ``ranking`` is the result of :func:`rank_log`, computed here if None.
    """
    entries, ordered = ranking if ranking is not None else rank_log(config)
    area_anomaly.write_ordered(ordered, config.ordered_clusters_scores)
    area_anomaly.plot_order_histograms(ordered, config.order_histogram_dir)
    if config.top_ranked > 0:
        area_anomaly.save_top_ranked_plots(ordered, entries, config.save_ordered_dir, top=config.top_ranked)
    logger.info("ranked the clusters of %d scans into %s", len(entries), config.ordered_clusters_scores)
    return ordered


def print_order(config, names=None, ranking=None):
    """Print each cluster's rank by ``config.order_key`` and write it as CSV.

    Parameters
    ----------
    config : PipelineConfig
    names : list of str or None
        Scans to report; None reports every scan in the log.
    ranking : tuple or None
        The result of :func:`rank_log`, computed here if None.
    """
    entries, ordered = ranking if ranking is not None else rank_log(config)

    logged = {entry["scan_name"] for entry in entries}
    if names is None:
        names = [entry["scan_name"] for entry in entries]
    missing = [name for name in names if name not in logged]
    if missing:
        logger.warning("no clusters log entry for %d scans, not printed: %s", len(missing), ", ".join(missing))
    names = [name for name in names if name in logged]

    rows = area_anomaly.order_rows(ordered, names, config.order_key)
    print(area_anomaly.format_order_table(rows))
    csv_path = os.path.join(config.area_anomaly_dir, f"order_{config.order_key}.csv")
    area_anomaly.write_order_csv(rows, csv_path)
    return rows


def _read_log_entries(config):
    if not os.path.exists(config.clusters_log):
        raise ValueError(
            f"clusters log {config.clusters_log} not found; run detection first or pass --clusters_scores_log"
        )
    return area_anomaly.read_clusters_log(config.clusters_log)


# Training data.


def prepare_data(scans_dir, data_dir, config):
    """Write labelled training crops from a folder of scans and split them.

    Crops go to ``<data_dir>/rescaled/normal|anomaly`` and the split to
    ``<data_dir>/shape/train|validation|test``, with all crops of a scan in
    the same split.
    """
    import split_data

    if not os.path.isdir(scans_dir):
        raise ValueError(f"--prepare_data_path={scans_dir} is not a folder; pass the folder that contains the scans")

    rescaled_dir = os.path.join(data_dir, "rescaled")
    scan_paths = sorted(
        os.path.join(scans_dir, entry)
        for entry in os.listdir(scans_dir)
        if os.path.splitext(entry)[1].lower() in {".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp"}
    )
    if not scan_paths:
        raise ValueError(f"--prepare_data_path={scans_dir} contains no PNG, TIFF or JPEG scan")

    counts = shape_anomaly.prepare_training_data(scan_paths, config.min_threshold, rescaled_dir)
    logger.info("wrote training crops into %s: %s", rescaled_dir, counts)
    split_counts = split_data.split_dataset(rescaled_dir, data_dir, group_by_scan=True)
    logger.info("split the crops into %s: %s", data_dir, split_counts)
