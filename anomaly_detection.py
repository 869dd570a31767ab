"""Find anomalous impurities and anomalous areas in metallographic scans.

This is the main command of MLography. For each scan that ``--input_scans``
matches, it extracts the impurities and scores them by spatial anomaly
(weighted k-th nearest neighbour), shape anomaly (autoencoder
reconstruction loss) and both combined. It then groups the most anomalous
ones into areas with market clustering, and writes tables and plots. ``--order`` ranks
every area of every scan in the clusters log, and ``--print_order`` prints
the ranks of the input scans' areas.

Example::

    python anomaly_detection.py --input_scans='examples/*.png' --min_threshold=30
"""

import glob
import logging
import os
import sys
import traceback

from absl import app, flags

import area_anomaly
import atomic_io
import scan_pipeline

FLAGS = flags.FLAGS
logger = logging.getLogger("mlography")

#: Exit status when some scans failed but the others completed.
EXIT_SCANS_FAILED = 1

#: Exit status for invalid flags or inputs that stop the run before any scan.
EXIT_USAGE = 2

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "shape_autoencoder.keras")

# Input and extraction.
flags.DEFINE_string("input_scans", "./tags_png_cropped/*.png", "Glob of the scans to process (PNG, TIFF, JPEG, ...).")
flags.DEFINE_integer(
    "min_threshold",
    0,
    "Gray level from 0 to 255, on the 8-bit scale that 16-bit scans are scaled to. Pixels at or below it "
    "are impurity pixels. Use 30 for the published scans.",
)
flags.DEFINE_list(
    "k",
    ["50"],
    "Comma-separated neighbour ranks k of the spatial score (a count of impurities), each at least 1. "
    "A scan with fewer than k + 1 significant impurities uses k = their count - 1.",
)

# Stages.
flags.DEFINE_boolean("detect", True, "Run detection on the input scans. False runs only --order/--print_order.")
flags.DEFINE_boolean(
    "shape_anomaly", True, "Score impurity shapes with the autoencoder. False uses the spatial score alone."
)
flags.DEFINE_boolean("overwrite", False, "Redo scans whose results already exist instead of skipping them.")

# Shape anomaly.
flags.DEFINE_string("model_name", DEFAULT_MODEL, "Autoencoder model file (.keras or .h5) with 100x100x1 input.")
flags.DEFINE_enum(
    "shape_loss",
    "reference",
    ["reference", "consistent"],
    "Reconstruction loss scale: 'reference' compares the 0-1 input with the 0-255 post-processed "
    "prediction as the published code does; 'consistent' compares both on the 0-1 scale.",
)
flags.DEFINE_boolean(
    "write_crops", False, "Also write the 100x100 px impurity crops as PNG into <logs_dir>/<scan>/crops/."
)

# Training data.
flags.DEFINE_boolean("prepare_data", False, "Write labelled training crops from --prepare_data_path and split them.")
flags.DEFINE_string("prepare_data_path", "./tags_png_cropped/", "Folder of scans to prepare training data from.")
flags.DEFINE_string("data_dir", "./data/", "Root folder of the training data that --prepare_data writes.")

# Area anomaly.
flags.DEFINE_integer(
    "area_clusters",
    10,
    "Number of initial clusters of market clustering, at least 1. A scan with fewer impurities of "
    "positive score uses one cluster per such impurity.",
)
flags.DEFINE_boolean(
    "reference_clustering",
    False,
    "Reproduce the published clustering code: price only against the first core impurity, and stop "
    "when the last cluster of a pass cannot expand.",
)
flags.DEFINE_string("logs_dir", "./logs/", "Folder of the per-scan outputs, one subfolder per scan.")
flags.DEFINE_string("area_anomaly_dir", "./logs/area/", "Folder of the area anomaly outputs.")
flags.DEFINE_string(
    "clusters_scores_log", None, "JSON log of every scan's clusters. Default: <area_anomaly_dir>/clusters_scores.txt."
)
flags.DEFINE_string("plots_dir", None, "Folder of the area anomaly plots. Default: <area_anomaly_dir>/plots/.")

# Ranking.
flags.DEFINE_boolean("order", False, "Rank the clusters of all scans in the clusters log by every order key.")
flags.DEFINE_boolean("print_order", False, "Print the rank of each cluster of the input scans by --order_key.")
flags.DEFINE_string(
    "order_key",
    "weighted_area2_sum_mult_diameter_mult_amount",
    f"Order key that --print_order reports, one of: {', '.join(area_anomaly.ORDER_KEYS)}.",
)
flags.DEFINE_string(
    "ordered_clusters_scores",
    None,
    "JSON file of the ranked clusters. Default: <area_anomaly_dir>/ordered_clusters_scores.json.",
)
flags.DEFINE_string("order_histogram", None, "Folder of the rank histograms. Default: <area_anomaly_dir>/histograms/.")
flags.DEFINE_string(
    "save_ordered_dir", None, "Folder of the plots of the top-ranked clusters. Default: <area_anomaly_dir>/ordered/."
)
flags.DEFINE_integer(
    "top_ranked", 50, "Number of top-ranked clusters per order key to plot with --order; 0 plots none."
)


class UsageError(ValueError):
    """Raised for invalid flags or inputs that stop the whole run."""


def find_scans(pattern):
    """Expand the ``--input_scans`` glob into a sorted list of files.

    Raises
    ------
    UsageError
        If the pattern matches nothing, only folders, or two scans with the
        same file name (their outputs would overwrite each other).
    """
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not matches:
        raise UsageError(
            f"--input_scans={pattern!r} matches no file; put the scans in ./tags_png_cropped/ "
            "or pass a glob such as --input_scans='path/to/scans/*.png'"
        )

    files = [path for path in matches if not os.path.isdir(path)]
    if not files:
        raise UsageError(f"--input_scans={pattern!r} matches only folders; add a file pattern such as '/*.png'")

    names = {}
    for path in files:
        name = scan_pipeline.scan_name(path)
        if name in names:
            raise UsageError(
                f"two scans share the name {name!r} ({names[name]} and {path}); "
                "rename one, because outputs are stored by scan name"
            )
        names[name] = path
    return files


def _parse_k_list(values):
    k_list = []
    for value in values:
        try:
            k = int(value)
        except ValueError:
            raise UsageError(f"--k={','.join(values)} is invalid: {value!r} is not an integer") from None
        if k <= 0:
            raise UsageError(f"--k={','.join(values)} is invalid: each k must be at least 1")
        if k not in k_list:
            k_list.append(k)
    if not k_list:
        raise UsageError("--k is empty; give at least one neighbour rank, for example --k=50")
    return k_list


def build_config():
    """Validate the flags and collect them into a :class:`scan_pipeline.PipelineConfig`.

    Raises
    ------
    UsageError
        If a flag value is out of range.
    """
    if not 0 <= FLAGS.min_threshold <= 255:
        raise UsageError(
            f"--min_threshold={FLAGS.min_threshold} is invalid: use a gray level from 0 to 255 "
            "(30 for the published scans)"
        )
    if FLAGS.area_clusters <= 0:
        raise UsageError(f"--area_clusters={FLAGS.area_clusters} is invalid: use at least 1 (default 10)")
    if FLAGS.top_ranked < 0:
        raise UsageError(f"--top_ranked={FLAGS.top_ranked} is invalid: use 0 or more")
    if FLAGS.order_key not in area_anomaly.ORDER_KEYS:
        raise UsageError(
            f"--order_key={FLAGS.order_key} is invalid: use one of {', '.join(area_anomaly.ORDER_KEYS)}"
        )

    area_dir = FLAGS.area_anomaly_dir
    return scan_pipeline.PipelineConfig(
        min_threshold=FLAGS.min_threshold,
        k_list=_parse_k_list(FLAGS.k),
        shape_anomaly=FLAGS.shape_anomaly,
        shape_loss=FLAGS.shape_loss,
        write_crops=FLAGS.write_crops,
        area_clusters=FLAGS.area_clusters,
        reference_clustering=FLAGS.reference_clustering,
        logs_dir=FLAGS.logs_dir,
        area_anomaly_dir=area_dir,
        clusters_log=FLAGS.clusters_scores_log or os.path.join(area_dir, "clusters_scores.txt"),
        plots_dir=FLAGS.plots_dir or os.path.join(area_dir, "plots"),
        ordered_clusters_scores=FLAGS.ordered_clusters_scores or os.path.join(area_dir, "ordered_clusters_scores.json"),
        order_histogram_dir=FLAGS.order_histogram or os.path.join(area_dir, "histograms"),
        save_ordered_dir=FLAGS.save_ordered_dir or os.path.join(area_dir, "ordered"),
        order_key=FLAGS.order_key,
        top_ranked=FLAGS.top_ranked,
        overwrite=FLAGS.overwrite,
    )


def _scans_for_ordering():
    # With --detect=False the scans may be gone, so an empty glob then means
    # every scan in the clusters log.
    try:
        return find_scans(FLAGS.input_scans)
    except UsageError:
        if FLAGS.detect:
            raise
        logger.info("--input_scans matches no file: --print_order reports every scan in the clusters log")
        return None


def _check_output_folders(config):
    """Create every output folder that the selected stages write into.

    This fails before the first scan, rather than after hours of detection,
    when a folder cannot be created or written.
    """
    folders = [config.logs_dir, config.area_anomaly_dir]
    if FLAGS.detect:
        folders += [os.path.dirname(os.path.abspath(config.clusters_log)), config.plots_dir]
    if FLAGS.order:
        folders += [
            os.path.dirname(os.path.abspath(config.ordered_clusters_scores)),
            config.order_histogram_dir,
        ]
        if config.top_ranked > 0:
            folders.append(config.save_ordered_dir)
    for folder in folders:
        atomic_io.ensure_dir(folder)


def execute():
    """Run the stages that the flags select and return the exit status."""
    config = build_config()

    if FLAGS.prepare_data:
        scan_pipeline.prepare_data(FLAGS.prepare_data_path, FLAGS.data_dir, config)

    if not (FLAGS.detect or FLAGS.order or FLAGS.print_order):
        return 0

    scan_paths = _scans_for_ordering()
    _check_output_folders(config)

    failed = []
    if FLAGS.detect:
        model = scan_pipeline.load_shape_model(FLAGS.model_name) if config.shape_anomaly else None
        summary = scan_pipeline.run_scans(scan_paths, config, model)
        failed = summary.failed

    if FLAGS.order or FLAGS.print_order:
        ranking = scan_pipeline.rank_log(config)
    if FLAGS.order:
        scan_pipeline.order_log(config, ranking)
    if FLAGS.print_order:
        names = None if scan_paths is None else [scan_pipeline.scan_name(path) for path in scan_paths]
        scan_pipeline.print_order(config, names, ranking)

    if failed:
        logger.error("%d of %d scans failed: %s", len(failed), len(scan_paths), ", ".join(failed))
        return EXIT_SCANS_FAILED
    return 0


def _fail(message):
    """Log a one-line error, with the traceback at --verbosity=1, and exit."""
    if FLAGS.verbosity >= 1 and sys.exc_info()[0] is not None:
        traceback.print_exc()
    logger.error("%s", message)
    sys.exit(EXIT_USAGE)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {' '.join(argv[1:])}; pass options as --name=value")

    try:
        status = execute()
    except (ValueError, OSError) as error:
        _fail(str(error))
    sys.exit(status)


if __name__ == "__main__":
    app.run(main)
