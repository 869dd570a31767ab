"""Measure how well the shape score separates irregular from round impurities.

For every scan of the held-out split, the script runs the steps of the main
command: extraction at ``--min_threshold``, crops of all significant
impurities, ``use_model.reconstruction_losses`` in each ``--shape_loss``
mode, and ``shape_anomaly.shape_scores`` (min-max normalised per scan).
Impurities with an area above ``--min_area`` are then labelled by their
circle ratio: anomalous above ``--anomaly_min_ratio``, normal at most
``--normal_max_ratio``, and left out in between. The ROC-AUC of the shape
score over all labelled impurities of the split, pooled across scans, is the
result. The AUC of the raw loss is reported beside it.

The circle ratio and the crop share their geometry: a thin or branched
impurity scaled to 80 px leaves more of the 100x100 canvas white. The script
therefore also reports a baseline that uses no model, the white fraction of
each crop (mean gray level / 255), both raw and through ``shape_scores``.
A model is useful only where it beats that baseline.

Usage::

    python bench/evaluate_shape_model.py --model=models/shape_autoencoder.keras \\
        --manifest=/work/train_work/data/shape/split_manifest.csv \\
        --scans_dir=../shared/data/tags_png_cropped --output=logs/shape_model_auc.json
"""

import os
import sys
import time

import numpy as np
import pandas as pd
from absl import app, flags, logging
from scipy.stats import rankdata

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import atomic_io  # noqa: E402
import shape_anomaly  # noqa: E402
import use_model  # noqa: E402
from impurity_extract import extract_impurities  # noqa: E402
from split_data import parse_crop_name  # noqa: E402

#: Name of the score that uses no model: the white fraction of each crop.
BASELINE = "white_fraction"


def roc_auc(scores, labels):
    """Compute the ROC-AUC of ``scores`` for binary ``labels`` from ranks.

    The AUC is the Mann-Whitney U statistic divided by the number of
    (positive, negative) pairs: the probability that a random positive
    scores higher than a random negative, counting ties as one half.

    Parameters
    ----------
    scores : (n,) array_like of float
        Higher means more anomalous.
    labels : (n,) array_like of bool
        True for positives (anomalous).

    Returns
    -------
    float
        AUC in [0, 1].

    Raises
    ------
    ValueError
        If the shapes differ or a class is empty.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D of one length, got {scores.shape} and {labels.shape}")
    n_positive = int(labels.sum())
    n_negative = len(labels) - n_positive
    if n_positive == 0 or n_negative == 0:
        raise ValueError(f"labels need both classes, got {n_positive} positives and {n_negative} negatives")

    ranks = rankdata(scores)
    rank_sum = ranks[labels].sum()
    return float((rank_sum - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative))


def held_out_scans(manifest_path, split):
    """Read the names of the scans whose crops split_data put into ``split``.

    Returns
    -------
    list of str
        Sorted scan names.
    """
    manifest = pd.read_csv(manifest_path)
    names = manifest.loc[manifest["split"] == split, "file"]
    return sorted({parse_crop_name(name)[1] for name in names})


def label_impurities(extraction, min_area, normal_max_ratio, anomaly_min_ratio):
    """Label the impurities of one scan by circle ratio.

    Returns
    -------
    ids : (k,) int64 ndarray
        Labelled impurity ids: area above ``min_area`` and ratio at most
        ``normal_max_ratio`` or above ``anomaly_min_ratio``.
    is_anomaly : (k,) bool ndarray
        True where the ratio is above ``anomaly_min_ratio``.
    """
    ratios = shape_anomaly.circle_scores(extraction.markers, extraction.areas, extraction.indices)
    large = extraction.areas > min_area
    normal = large & (ratios <= normal_max_ratio)
    anomaly = large & (ratios > anomaly_min_ratio) & np.isfinite(ratios)
    ids = np.flatnonzero(normal | anomaly)
    return ids, anomaly[ids]


def score_scan(scan_path, model, modes, min_threshold):
    """Compute the shape score and raw loss of every cropped impurity of one scan.

    Returns
    -------
    extraction : impurity_extract.ImpurityExtraction
        Impurities of the scan.
    scores : dict
        For each mode and for ``"white_fraction"`` (the baseline),
        ``(shape_score, raw)``: two (n,) arrays over all impurity ids, NaN
        raw value for ids without a crop.
    crop_ids : (N,) int64 ndarray
        Ids of the cropped impurities.
    """
    extraction = extract_impurities(scan_path, min_threshold)
    crop_ids, crops = shape_anomaly.impurity_crops(extraction.markers, extraction.boxes, extraction.indices)

    raw_values = {mode: use_model.reconstruction_losses(model, crops, mode=mode) for mode in modes}
    raw_values[BASELINE] = crops.mean(axis=(1, 2)) / 255.0

    scores = {}
    for name, values in raw_values.items():
        shape = shape_anomaly.shape_scores(crop_ids, values, extraction.n_impurities)
        raw_by_id = np.full(extraction.n_impurities, np.nan)
        raw_by_id[crop_ids] = values
        scores[name] = (shape, raw_by_id)
    return extraction, scores, crop_ids


def evaluate(model_path, scans_dir, scan_names, modes, min_threshold, min_area, normal_max_ratio, anomaly_min_ratio):
    """Pool the labelled impurities of ``scan_names`` and compute the AUC per mode.

    Returns
    -------
    dict
        Counts, AUCs and timing, ready to write as JSON.
    """
    model = use_model.load_model(model_path)
    names = [*modes, BASELINE]
    pooled = {name: {"shape": [], "raw": []} for name in names}
    labels = []
    n_crops = 0
    n_uncropped = 0
    start = time.monotonic()

    for index, scan in enumerate(scan_names):
        extraction, scores, crop_ids = score_scan(os.path.join(scans_dir, f"{scan}.png"), model, modes, min_threshold)
        ids, is_anomaly = label_impurities(extraction, min_area, normal_max_ratio, anomaly_min_ratio)

        # Impurities too elongated to crop have no loss, so they are left out.
        cropped = np.isin(ids, crop_ids)
        n_uncropped += int((~cropped).sum())
        ids, is_anomaly = ids[cropped], is_anomaly[cropped]
        labels.append(is_anomaly)
        scan_crops = len(crop_ids)
        n_crops += scan_crops
        for name in names:
            pooled[name]["shape"].append(scores[name][0][ids])
            pooled[name]["raw"].append(scores[name][1][ids])
        logging.info("%d/%d %s: %d crops, %d labelled", index + 1, len(scan_names), scan, scan_crops, len(ids))

    labels = np.concatenate(labels)
    result = {
        "model": os.fspath(model_path),
        "scans": scan_names,
        "crops_scored": n_crops,
        "labelled_normal": int((~labels).sum()),
        "labelled_anomaly": int(labels.sum()),
        "labelled_without_crop": n_uncropped,
        "seconds": round(time.monotonic() - start, 1),
        "auc": {},
    }
    for name in names:
        result["auc"][name] = {
            "shape_score": roc_auc(np.concatenate(pooled[name]["shape"]), labels),
            "raw": roc_auc(np.concatenate(pooled[name]["raw"]), labels),
        }
        logging.info("%s: AUC of shape score %.4f, of raw value %.4f", name, *result["auc"][name].values())
    return result


FLAGS = flags.FLAGS


def _define_flags():
    flags.DEFINE_string("model", "models/shape_autoencoder.keras", "Shape autoencoder to evaluate.")
    flags.DEFINE_string("manifest", None, "split_manifest.csv written by split_data.py --group_by_scan.")
    flags.DEFINE_string("split", "test", "Split whose scans are evaluated.")
    flags.DEFINE_string("scans_dir", None, "Folder of the scans, <scan>.png.")
    flags.DEFINE_list("modes", list(use_model.LOSS_MODES), "Loss modes of use_model.reconstruction_losses.")
    flags.DEFINE_integer("min_threshold", 30, "Gray level (0-255) of the impurity extraction.")
    flags.DEFINE_float("min_area", 50, "Only impurities with a larger area, in px^2, are labelled.")
    flags.DEFINE_float("normal_max_ratio", 0.3, "Largest circle ratio of a normal impurity.")
    flags.DEFINE_float("anomaly_min_ratio", 0.55, "Circle ratios above this are anomalous.")
    flags.DEFINE_string("output", os.path.join("logs", "shape_model_auc.json"), "JSON file for the results.")
    flags.mark_flags_as_required(["manifest", "scans_dir"])


def main(argv):
    """Run the evaluation from the command-line flags; return the exit code."""
    del argv
    scan_names = held_out_scans(FLAGS.manifest, FLAGS.split)
    if not scan_names:
        logging.error("manifest %s lists no crop in split %s; pass the manifest of the split", FLAGS.manifest, FLAGS.split)
        return 1

    result = evaluate(
        FLAGS.model,
        FLAGS.scans_dir,
        scan_names,
        FLAGS.modes,
        FLAGS.min_threshold,
        FLAGS.min_area,
        FLAGS.normal_max_ratio,
        FLAGS.anomaly_min_ratio,
    )
    atomic_io.write_json(FLAGS.output, result)
    logging.info("wrote %s", FLAGS.output)
    return 0


if __name__ == "__main__":
    _define_flags()
    app.run(main)
