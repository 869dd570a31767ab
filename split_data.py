"""Split prepared impurity crops into train, validation and test folders.

The input folder contains one subfolder per class, ``normal/`` and
``anomaly/``, of 100x100 PNG crops named ``<ratio><scan>_impurity_<id>.png``
(as written by ``shape_anomaly.prepare_training_data``). The output is the
layout that ``neural_net.py`` reads::

    <output_dir>/<name>/train/normal/
    <output_dir>/<name>/train/anomaly/        (two-class split only)
    <output_dir>/<name>/validation/...
    <output_dir>/<name>/test/...
    <output_dir>/<name>/split_manifest.csv

The split is random but seeded: the same files, fractions and seed always
give the same split. With ``group_by_scan`` all crops of one scan go to the
same split, so the test split holds out whole scans.

Usage::

    python split_data.py --input_dir=/work/train_work/rescaled \\
        --output_dir=./data --name=shape --classes=2 --group_by_scan
"""

import os
import re
import shutil
import tempfile

import numpy as np
import pandas as pd
from absl import app, flags, logging

import atomic_io

#: Split folder names, in the order of the fractions.
SPLITS = ("train", "validation", "test")

#: Class folder names. A one-class split uses only the first.
CLASSES = ("normal", "anomaly")

#: Default fractions of the crops that go to train, validation and test.
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)

#: File name of the table that lists which split each crop went to.
MANIFEST_NAME = "split_manifest.csv"

#: Crop file extension; other files in a class folder are ignored.
CROP_EXTENSION = ".png"

# ``<ratio><scan>_impurity_<id>.png``. The ratio is a decimal number as
# Python prints a float, and can be slightly negative for small round
# impurities. It is glued to the scan name, so a scan name that starts with a
# digit, a dot or an "e" followed by a digit cannot be distinguished from it.
_CROP_NAME = re.compile(
    r"^(?P<ratio>-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)(?P<scan>.+)_impurity_(?P<id>\d+)\.png$"
)


class SplitDataError(ValueError):
    """Raised when the input data cannot be split as requested."""


def parse_crop_name(filename):
    """Parse the shape ratio, scan name and impurity id from a crop file name.

    Parameters
    ----------
    filename : str
        Base name ``<ratio><scan>_impurity_<id>.png``, for example
        ``0.4132scan1tag-47_impurity_12.png``.

    Returns
    -------
    ratio : float
        Shape ratio written in the name (dimensionless).
    scan : str
        Scan name, for example ``scan1tag-47``.
    impurity_id : int
        Impurity id within the scan.

    Raises
    ------
    ValueError
        If ``filename`` does not follow the pattern.
    """
    match = _CROP_NAME.match(os.path.basename(filename))
    if match is None:
        raise ValueError(
            f"filename {filename!r} does not match <ratio><scan>_impurity_<id>.png; "
            "write the crops with shape_anomaly.prepare_training_data"
        )
    return float(match["ratio"]), match["scan"], int(match["id"])


def validate_fractions(fractions):
    """Check split fractions and return them as a float array.

    Parameters
    ----------
    fractions : sequence of 3 float
        Fractions of the crops for train, validation and test.

    Returns
    -------
    (3,) float64 ndarray
        The fractions.

    Raises
    ------
    ValueError
        If there are not three fractions, one is negative or not finite,
        the train fraction is zero, or they do not sum to 1.
    """
    values = np.asarray(fractions, dtype=np.float64)
    if values.shape != (3,):
        raise ValueError(f"fractions must be 3 values (train, validation, test), got {list(fractions)}")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"fractions must be finite and non-negative, got {list(fractions)}")
    if values[0] == 0:
        raise ValueError(f"fractions: the train fraction must be positive, got {list(fractions)}")
    if abs(values.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {list(fractions)} (sum {values.sum():.6g})")
    return values


def split_sizes(n_items, fractions):
    """Divide ``n_items`` into three sizes proportional to ``fractions``.

    Each size is the floor of its share, and the items left over go one each
    to the splits with the largest remainders (the earlier split on a tie),
    so the sizes always sum to ``n_items``.

    Parameters
    ----------
    n_items : int
        Number of items to divide.
    fractions : sequence of 3 float
        Fractions for train, validation and test, summing to 1.

    Returns
    -------
    list of 3 int
        Sizes of train, validation and test.
    """
    shares = np.asarray(fractions, dtype=np.float64) * n_items
    sizes = np.floor(shares + 1e-9).astype(int)

    remainders = shares - sizes
    order = np.argsort(-remainders, kind="stable")
    for index in order[: n_items - sizes.sum()]:
        sizes[index] += 1
    return sizes.tolist()


def list_crops(class_dir):
    """List the crop files of one class folder, sorted by name.

    Parameters
    ----------
    class_dir : str
        Class folder, for example ``<input_dir>/normal``.

    Returns
    -------
    list of str
        Base names of the ``.png`` files in ``class_dir``.
    """
    names = sorted(
        name
        for name in os.listdir(class_dir)
        if name.lower().endswith(CROP_EXTENSION) and os.path.isfile(os.path.join(class_dir, name))
    )
    return names


def _collect_inputs(input_dir, classes):
    if not os.path.isdir(input_dir):
        raise SplitDataError(
            f"input folder {input_dir} not found; pass --input_dir, the folder that contains normal/ and anomaly/"
        )

    crops = {}
    for class_name in classes:
        class_dir = os.path.join(input_dir, class_name)
        if class_name == "anomaly" and not os.path.isdir(class_dir):
            raise SplitDataError(
                f"class folder {class_dir} not found, but two classes were requested; "
                "add anomalous crops or pass --classes=1 to split the normal class only"
            )
        if not os.path.isdir(class_dir):
            raise SplitDataError(f"class folder {class_dir} not found; prepare the crops into {input_dir} first")

        names = list_crops(class_dir)
        if not names:
            fix = (
                "add anomalous crops or pass --classes=1 to split the normal class only"
                if class_name == "anomaly"
                else "prepare the crops first"
            )
            raise SplitDataError(f"class folder {class_dir} contains no {CROP_EXTENSION} crops; {fix}")
        crops[class_name] = names
    return crops


def _assign_random(crops, fractions, rng):
    assignment = {}
    for class_name, names in crops.items():
        order = rng.permutation(len(names))
        sizes = split_sizes(len(names), fractions)
        bounds = np.cumsum([0] + sizes)
        for split_index, split in enumerate(SPLITS):
            for position in order[bounds[split_index] : bounds[split_index + 1]]:
                assignment[(class_name, names[position])] = split
    return assignment


def _scan_of(class_dir_name, filename):
    try:
        return parse_crop_name(filename)[1]
    except ValueError as error:
        raise SplitDataError(f"{class_dir_name}/{filename}: {error}; or split without --group_by_scan") from None


def _assign_by_scan(crops, fractions, rng):
    scan_sizes = {}
    scan_of_crop = {}
    for class_name, names in crops.items():
        for name in names:
            scan = _scan_of(class_name, name)
            scan_of_crop[(class_name, name)] = scan
            scan_sizes[scan] = scan_sizes.get(scan, 0) + 1

    # Scans are shuffled and laid end to end by crop count. Each scan goes to
    # the split whose fraction interval contains the middle of its run, so
    # the split sizes follow the fractions as closely as whole scans allow.
    scans = sorted(scan_sizes)
    scans = [scans[i] for i in rng.permutation(len(scans))]
    counts = np.array([scan_sizes[scan] for scan in scans], dtype=np.float64)
    middles = (np.cumsum(counts) - counts / 2) / counts.sum()
    edges = np.cumsum(fractions)[:-1]
    split_of_scan = {scan: SPLITS[int(np.searchsorted(edges, middle, side="right"))] for scan, middle in zip(scans, middles)}

    return {key: split_of_scan[scan] for key, scan in scan_of_crop.items()}


def _link_or_copy(source, destination):
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _check_output(target_dir, overwrite):
    if os.path.isdir(target_dir) and os.listdir(target_dir) and not overwrite:
        raise SplitDataError(f"output folder {target_dir} is not empty; pass --overwrite to replace it")
    if os.path.exists(target_dir) and not os.path.isdir(target_dir):
        raise SplitDataError(f"output path {target_dir} exists as a file; choose another --output_dir or --name")


def _write_split(input_dir, staging_dir, assignment, classes):
    for split in SPLITS:
        for class_name in classes:
            atomic_io.ensure_dir(os.path.join(staging_dir, split, class_name))

    rows = []
    for (class_name, name), split in sorted(assignment.items()):
        source = os.path.join(input_dir, class_name, name)
        _link_or_copy(source, os.path.join(staging_dir, split, class_name, name))
        rows.append({"file": name, "class": class_name, "split": split})
    return pd.DataFrame(rows, columns=["file", "class", "split"])


def _replace_folder(staging_dir, target_dir):
    # The old folder is renamed away before the new one is renamed into
    # place, so an interrupted run leaves one of them complete.
    old_dir = None
    if os.path.exists(target_dir):
        old_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(target_dir)}.old.", dir=os.path.dirname(target_dir))
        os.rmdir(old_dir)
        os.replace(target_dir, old_dir)
    os.replace(staging_dir, target_dir)
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


def count_split(assignment, classes):
    """Count crops per split and class.

    Parameters
    ----------
    assignment : dict
        Maps ``(class_name, filename)`` to a split name.
    classes : sequence of str
        Class names to count.

    Returns
    -------
    dict
        ``counts[split][class_name]``, number of crops.
    """
    counts = {split: {class_name: 0 for class_name in classes} for split in SPLITS}
    for (class_name, _), split in assignment.items():
        counts[split][class_name] += 1
    return counts


def split_dataset(
    input_dir,
    output_dir,
    name="shape",
    n_classes=2,
    fractions=DEFAULT_FRACTIONS,
    seed=0,
    group_by_scan=False,
    overwrite=False,
):
    """Split the crops of ``input_dir`` into train, validation and test folders.

    Files are hard-linked where the file system allows it and copied
    otherwise. The split is written to a temporary folder beside the
    destination and renamed into place when complete.

    Parameters
    ----------
    input_dir : str
        Folder with ``normal/`` and, for two classes, ``anomaly/`` crops.
    output_dir : str
        Folder in which the ``name`` folder is created.
    name : str, optional
        Name of the data set folder, a single path component; ``"shape"``
        by default, the folder that ``neural_net.py`` reads by default.
    n_classes : {1, 2}
        1 splits ``normal/`` only, 2 splits ``normal/`` and ``anomaly/``.
    fractions : sequence of 3 float
        Fractions of crops for train, validation and test, summing to 1.
    seed : int
        Seed of the random split.
    group_by_scan : bool
        If True, keep all crops of one scan (both classes) in the same
        split. The sizes then follow ``fractions`` by crop count as closely
        as whole scans allow.
    overwrite : bool
        If True, replace a non-empty ``<output_dir>/<name>`` folder.

    Returns
    -------
    dict
        ``counts[split][class_name]``, number of crops in each split folder.

    Raises
    ------
    ValueError
        On an invalid argument, a missing or empty input folder, a missing
        ``anomaly/`` folder when two classes were requested, a crop name that
        ``group_by_scan`` cannot parse, or a non-empty output folder without
        ``overwrite``.
    """
    if n_classes not in (1, 2):
        raise ValueError(f"n_classes must be 1 or 2, got {n_classes!r}")
    if not name or os.sep in name or name in (".", ".."):
        raise ValueError(f"name must be a single folder name, got {name!r}")
    fractions = validate_fractions(fractions)
    classes = CLASSES[:n_classes]

    input_dir = os.fspath(input_dir)
    target_dir = os.path.join(os.fspath(output_dir), name)
    crops = _collect_inputs(input_dir, classes)
    _check_output(target_dir, overwrite)

    rng = np.random.default_rng(seed)
    if group_by_scan:
        assignment = _assign_by_scan(crops, fractions, rng)
    else:
        assignment = _assign_random(crops, fractions, rng)
    counts = count_split(assignment, classes)

    atomic_io.ensure_dir(output_dir)
    staging_dir = tempfile.mkdtemp(prefix=f".{name}.", suffix=atomic_io.TEMP_SUFFIX, dir=output_dir)
    try:
        manifest = _write_split(input_dir, staging_dir, assignment, classes)
        atomic_io.write_csv(os.path.join(staging_dir, MANIFEST_NAME), manifest)
        _replace_folder(staging_dir, target_dir)
    except BaseException:
        shutil.rmtree(staging_dir, ignore_errors=True)
        raise

    _log_counts(target_dir, counts, fractions)
    return counts


def _log_counts(target_dir, counts, fractions):
    logging.info("wrote split to %s", target_dir)
    for split, split_fraction in zip(SPLITS, fractions):
        per_class = ", ".join(f"{class_name} {n}" for class_name, n in counts[split].items())
        logging.info("  %s: %s", split, per_class)
        if split_fraction > 0 and not all(counts[split].values()):
            logging.warning("split %s has a class with no crops; use more scans or other fractions", split)


FLAGS = flags.FLAGS


def _define_flags():
    # Defined only when run as a script, so that importing this module
    # next to others that define absl flags of the same name works.
    flags.DEFINE_string("input_dir", None, "Folder that contains the normal/ and anomaly/ crop folders.")
    flags.DEFINE_string("output_dir", "data", "Folder in which the data set folder --name is created.")
    flags.DEFINE_string("name", "shape", "Name of the data set folder inside --output_dir.")
    flags.DEFINE_enum("classes", "2", ["1", "2"], "1: split normal/ only; 2: split normal/ and anomaly/.")
    flags.DEFINE_list("fractions", ["0.6", "0.2", "0.2"], "Fractions of crops for train, validation, test; sum 1.")
    flags.DEFINE_integer("seed", 0, "Seed of the random split.")
    flags.DEFINE_bool("group_by_scan", False, "Keep all crops of one scan in the same split.")
    flags.DEFINE_bool("overwrite", False, "Replace a non-empty output data set folder.")
    flags.mark_flag_as_required("input_dir")


def main(argv):
    """Run the split from the command-line flags; return the exit code."""
    del argv
    try:
        fractions = [float(value) for value in FLAGS.fractions]
    except ValueError:
        logging.error("--fractions must be 3 numbers such as 0.6,0.2,0.2, got %s", ",".join(FLAGS.fractions))
        return 1

    try:
        split_dataset(
            FLAGS.input_dir,
            FLAGS.output_dir,
            FLAGS.name,
            n_classes=int(FLAGS.classes),
            fractions=fractions,
            seed=FLAGS.seed,
            group_by_scan=FLAGS.group_by_scan,
            overwrite=FLAGS.overwrite,
        )
    except (ValueError, OSError) as error:
        logging.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    _define_flags()
    app.run(main)
