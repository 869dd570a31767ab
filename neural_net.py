"""Train the convolutional autoencoder that scores impurity shapes.

The autoencoder reads a 100x100 grayscale impurity crop scaled to [0, 1] and
outputs a sigmoid reconstruction of it, trained with the mean squared error.
A crop that the network reconstructs badly has an unusual shape.

With the blank label (``--anomaly_blank_label=True``, the default) the
training set also contains anomalous crops whose target is an all-white
image (all ones), so the network learns to fail on anomalous shapes. Normal
crops always have themselves as the target. Without the blank label, only
normal crops are used.

Training crops get random horizontal and vertical flips and a random
rotation over the full circle, with white (1.0) filled in at the corners.
The same transform is applied to the input and to the target.

The data folder is the layout written by ``split_data.py``::

    <data_dir>/train/normal/      <data_dir>/train/anomaly/
    <data_dir>/validation/...     <data_dir>/test/...

Usage::

    python neural_net.py --model_name=shape_autoencoder \\
        --anomaly_blank_label=True --data_dir=data/shape --epochs=20

Outputs in ``--output_dir``, each written atomically: ``NAME.keras`` (the
model with the lowest validation loss, without optimizer state),
``NAME_summary.txt``, ``NAME_history.csv``, ``NAME_loss_vs_epochs.png`` and
``NAME_test_losses.json``.
"""

import math
import os
import time

import cv2
import numpy as np
import pandas as pd
from absl import app, flags, logging

import atomic_io
from split_data import CLASSES

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402  (must follow the TensorFlow log level setting)
import tensorflow as tf  # noqa: E402

#: Side of a square crop, in px.
CROP_SIZE = 100

#: Model input shape: height, width, channels.
INPUT_SHAPE = (CROP_SIZE, CROP_SIZE, 1)

#: Architectures that ``build_model`` accepts.
ARCHITECTURES = ("compact", "paper")

#: Adam learning rate of each architecture when none is given. The paper
#: architecture uses the published 1e-5.
DEFAULT_LEARNING_RATES = {"compact": 1e-3, "paper": 1e-5}

#: Pixel value of the blank target and of the fill outside a rotated crop.
WHITE = 1.0


class TrainingDataError(ValueError):
    """Raised when the data folder cannot be used for training."""


# ---------------------------------------------------------------------------
# Data


def list_class_files(data_dir, split, class_name):
    """List the crop files of one split and class, sorted by name.

    Parameters
    ----------
    data_dir : str
        Data set folder written by split_data.py.
    split : str
        One of ``train``, ``validation``, ``test``.
    class_name : str
        ``normal`` or ``anomaly``.

    Returns
    -------
    list of str
        Full paths of the ``.png`` files. Empty if the folder is empty.

    Raises
    ------
    TrainingDataError
        If the folder does not exist.
    """
    folder = os.path.join(data_dir, split, class_name)
    if not os.path.isdir(folder):
        raise TrainingDataError(
            f"split folder {folder} not found; write the data set with split_data.py "
            f"(--classes=2 for anomaly/) or pass the right --data_dir"
        )
    names = sorted(name for name in os.listdir(folder) if name.lower().endswith(".png"))
    return [os.path.join(folder, name) for name in names]


def read_crops(paths):
    """Read 100x100 grayscale crops.

    Parameters
    ----------
    paths : sequence of str
        PNG files.

    Returns
    -------
    (n, 100, 100, 1) uint8 ndarray
        The crops, 0 black to 255 white.

    Raises
    ------
    TrainingDataError
        If a file cannot be read or is not 100x100 px.
    """
    crops = np.empty((len(paths), *INPUT_SHAPE), dtype=np.uint8)
    for index, path in enumerate(paths):
        image = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise TrainingDataError(f"cannot read crop {path}; remove it or prepare the crops again")
        if image.shape != INPUT_SHAPE[:2]:
            raise TrainingDataError(
                f"crop {path} is {image.shape[1]}x{image.shape[0]} px, expected {CROP_SIZE}x{CROP_SIZE}; "
                "prepare the crops again"
            )
        crops[index, ..., 0] = image
    return crops


def _subsample(paths, max_count, rng):
    if not max_count or len(paths) <= max_count:
        return paths
    chosen = np.sort(rng.choice(len(paths), size=max_count, replace=False))
    return [paths[i] for i in chosen]


def load_split(data_dir, split, classes, max_normal=None, seed=0):
    """Read the crops of one split.

    Parameters
    ----------
    data_dir : str
        Data set folder written by split_data.py.
    split : str
        One of ``train``, ``validation``, ``test``.
    classes : sequence of str
        ``("normal",)`` or ``("normal", "anomaly")``.
    max_normal : int, optional
        If given, read a random subset of at most this many normal crops,
        chosen with ``seed``. Anomalous crops are always all read.
    seed : int
        Seed of the subset.

    Returns
    -------
    crops : (n, 100, 100, 1) uint8 ndarray
        Normal crops first, then anomalous crops.
    is_anomaly : (n,) bool ndarray
        True for anomalous crops.
    paths : list of str
        File of each crop.

    Raises
    ------
    TrainingDataError
        If a folder is missing or the normal folder is empty.
    """
    rng = np.random.default_rng(seed)
    paths_by_class = {name: list_class_files(data_dir, split, name) for name in classes}
    if not paths_by_class["normal"]:
        raise TrainingDataError(
            f"split folder {os.path.join(data_dir, split, 'normal')} contains no crops; "
            "split more data with split_data.py or change its --fractions"
        )
    paths_by_class["normal"] = _subsample(paths_by_class["normal"], max_normal, rng)

    paths = [path for name in classes for path in paths_by_class[name]]
    is_anomaly = np.array([name == "anomaly" for name in classes for _ in paths_by_class[name]], dtype=bool)
    return read_crops(paths), is_anomaly, paths


def check_training_classes(is_anomaly, data_dir):
    """Raise unless the training split has anomalous crops for the blank label.

    Raises
    ------
    TrainingDataError
        If ``is_anomaly`` has no True value.
    """
    if not np.any(is_anomaly):
        folder = os.path.join(data_dir, "train", "anomaly")
        raise TrainingDataError(
            f"split folder {folder} contains no crops, but the blank label needs anomalous crops; "
            "split two-class data with split_data.py --classes=2 or pass --anomaly_blank_label=False"
        )


def build_augmenter(seed):
    """Build the random flip and full-circle rotation used on training crops.

    Parameters
    ----------
    seed : int
        Seed of the random transforms.

    Returns
    -------
    keras.Sequential
        Maps a float batch (n, 100, 100, 1) in [0, 1] to a transformed
        batch. Each crop gets its own transform. Pixels rotated in from
        outside the crop are white (1.0).
    """
    # A RandomRotation factor of 0.5 draws angles from [-pi, pi].
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal_and_vertical", seed=seed),
            keras.layers.RandomRotation(0.5, fill_mode="constant", fill_value=WHITE, seed=seed + 1),
        ],
        name="augmenter",
    )


def make_targets(inputs, is_anomaly, blank_label):
    """Build the training targets of a batch.

    Parameters
    ----------
    inputs : (n, 100, 100, 1) float tensor
        Crops in [0, 1], after any augmentation.
    is_anomaly : (n,) bool tensor
        True for anomalous crops.
    blank_label : bool
        If True, anomalous crops get an all-white target (all ones).
        If False, every crop is its own target.

    Returns
    -------
    (n, 100, 100, 1) float32 tensor
        The targets.
    """
    if not blank_label:
        return inputs
    mask = tf.reshape(is_anomaly, (-1, 1, 1, 1))
    return tf.where(mask, tf.ones_like(inputs), inputs)


def make_dataset(crops, is_anomaly, batch_size, blank_label, augmenter=None, shuffle_seed=None, repeat=False):
    """Build a tf.data pipeline of (input, target) batches.

    Parameters
    ----------
    crops : (n, 100, 100, 1) uint8 ndarray
        Crops, 0 black to 255 white.
    is_anomaly : (n,) bool ndarray
        True for anomalous crops.
    batch_size : int
        Crops per batch.
    blank_label : bool
        If True, anomalous crops get an all-white target.
    augmenter : keras.Layer, optional
        Random transform applied to the inputs before the targets are
        built, so each normal target is its transformed input.
    shuffle_seed : int, optional
        If given, shuffle the crops with this seed, again on every pass.
    repeat : bool
        If True, repeat the data without end.

    Returns
    -------
    tf.data.Dataset
        Batches of (inputs, targets), float32 in [0, 1].
    """
    dataset = tf.data.Dataset.from_tensor_slices((crops, is_anomaly))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(crops), seed=shuffle_seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.batch(batch_size)

    def to_pair(batch_crops, batch_is_anomaly):
        inputs = tf.cast(batch_crops, tf.float32) / 255.0
        if augmenter is not None:
            inputs = augmenter(inputs, training=True)
        return inputs, make_targets(inputs, batch_is_anomaly, blank_label)

    return dataset.map(to_pair, num_parallel_calls=1).prefetch(1)


# ---------------------------------------------------------------------------
# Models


def build_compact_model():
    """Build the compact convolutional autoencoder.

    Four stride-2 3x3 convolutions (16, 32, 64, 64 filters) take the crop to
    7x7x64, a 1x1 convolution to the 7x7x8 bottleneck, and four stride-2
    3x3 transposed convolutions back to 112x112, cropped to 100x100. A last
    3x3 convolution with a sigmoid gives the reconstruction.

    Returns
    -------
    keras.Model
        Input (None, 100, 100, 1), output (None, 100, 100, 1) in (0, 1).
    """
    layers = keras.layers
    inputs = keras.Input(INPUT_SHAPE, name="crop")

    hidden = inputs
    for filters in (16, 32, 64, 64):
        hidden = layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(hidden)
    hidden = layers.Conv2D(8, 1, activation="relu", name="bottleneck")(hidden)

    for filters in (64, 64, 32, 16):
        hidden = layers.Conv2DTranspose(filters, 3, strides=2, padding="same", activation="relu")(hidden)
    hidden = layers.Cropping2D(6)(hidden)
    outputs = layers.Conv2D(1, 3, padding="same", activation="sigmoid", name="reconstruction")(hidden)

    return keras.Model(inputs, outputs, name="compact_autoencoder")


def paper_layers():
    """Create the unbuilt layers of the published MLography autoencoder.

    Four blocks of a 5x5 convolution (256 filters, ReLU, same padding) and
    a 2x2 max pooling (same padding) take 100x100 to 7x7. A same-padded
    convolution and a 2x upsampling give 14x14, then three blocks of a
    valid 5x5 convolution and a 2x upsampling give 56x56x256. A 500-unit
    ReLU dense layer and a 10000-unit sigmoid dense layer reshaped to
    100x100x1 give the reconstruction.

    Returns
    -------
    list of keras.Layer
        The layers in order, to be applied to a (100, 100, 1) input.
    """
    layers = keras.layers
    stack = []
    for _ in range(4):
        stack.append(layers.Conv2D(256, 5, padding="same", activation="relu"))
        stack.append(layers.MaxPooling2D(2, padding="same"))
    stack.append(layers.Conv2D(256, 5, padding="same", activation="relu"))
    stack.append(layers.UpSampling2D(2))
    for _ in range(3):
        stack.append(layers.Conv2D(256, 5, padding="valid", activation="relu"))
        stack.append(layers.UpSampling2D(2))
    stack.append(layers.Flatten())
    stack.append(layers.Dense(500, activation="relu"))
    stack.append(layers.Dense(CROP_SIZE * CROP_SIZE, activation="sigmoid"))
    stack.append(layers.Reshape(INPUT_SHAPE))
    return stack


def build_paper_model():
    """Build the published MLography autoencoder.

    It has 417,895,748 parameters, about 1.7 GB of float32 weights. A
    process that only built it peaked at 5.6 GB resident memory
    (TensorFlow 2.21 on CPU). Training with Adam adds two more copies of
    the weights for the moment estimates, plus the gradients.

    Returns
    -------
    keras.Model
        Input (None, 100, 100, 1), output (None, 100, 100, 1) in (0, 1).
    """
    inputs = keras.Input(INPUT_SHAPE, name="crop")
    hidden = inputs
    for layer in paper_layers():
        hidden = layer(hidden)
    return keras.Model(inputs, hidden, name="paper_autoencoder")


def build_model(architecture):
    """Build the autoencoder named by ``architecture``.

    Parameters
    ----------
    architecture : {"compact", "paper"}
        Which network to build.

    Returns
    -------
    keras.Model
        The uncompiled model.

    Raises
    ------
    ValueError
        If ``architecture`` is not a known name.
    """
    if architecture == "compact":
        return build_compact_model()
    if architecture == "paper":
        return build_paper_model()
    raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")


# ---------------------------------------------------------------------------
# Training outputs


def save_inference_model(model, path):
    """Save the architecture and weights of ``model`` atomically, without optimizer state.

    Keras 3.15 ignores ``include_optimizer=False`` for ``.keras`` files (it
    applies only to legacy ``.h5`` files), so an uncompiled copy of the
    model is saved instead.

    Parameters
    ----------
    model : keras.Model
        Trained model.
    path : str
        Destination ``.keras`` file.
    """
    inference_copy = keras.Model.from_config(model.get_config())
    inference_copy.set_weights(model.get_weights())
    with atomic_io.atomic_path(path) as temp_path:
        inference_copy.save(temp_path)


class EpochRecorder(keras.callbacks.Callback):
    """Keep the model with the lowest validation loss and the loss history.

    After every epoch the history CSV is rewritten, and when the validation
    loss is the lowest so far the model is saved without optimizer state.
    Both writes are atomic, so an interrupted training keeps the last
    complete model and history. See ``save_inference_model``.

    Parameters
    ----------
    model_path : str
        Destination ``.keras`` file of the best model.
    history_path : str
        Destination CSV of the per-epoch losses.
    """

    def __init__(self, model_path, history_path):
        super().__init__()
        self.model_path = model_path
        self.history_path = history_path
        self.rows = []
        self.best_loss = math.inf
        self.best_epoch = None
        self._epoch_start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row = {
            "epoch": epoch + 1,
            "loss": float(logs["loss"]),
            "val_loss": float(logs["val_loss"]),
            "seconds": time.monotonic() - self._epoch_start,
        }
        self.rows.append(row)

        if row["val_loss"] < self.best_loss:
            self.best_loss = row["val_loss"]
            self.best_epoch = row["epoch"]
            save_inference_model(self.model, self.model_path)
        atomic_io.write_csv(self.history_path, self.history_frame())

        logging.info(
            "epoch %d: loss %.6f, val_loss %.6f, %.1f s%s",
            row["epoch"],
            row["loss"],
            row["val_loss"],
            row["seconds"],
            " (best, saved)" if self.best_epoch == row["epoch"] else "",
        )

    def history_frame(self):
        """Return the recorded epochs as a DataFrame."""
        return pd.DataFrame(self.rows, columns=["epoch", "loss", "val_loss", "seconds"])


def plot_losses(history, path):
    """Plot training and validation loss against the epoch.

    Parameters
    ----------
    history : pandas.DataFrame
        Columns ``epoch``, ``loss`` and ``val_loss``.
    path : str
        Destination PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(history["epoch"], history["loss"], marker="o", label="training")
    axes.plot(history["epoch"], history["val_loss"], marker="o", label="validation")
    axes.set_xlabel("epoch")
    axes.set_ylabel("mean squared error")
    axes.legend()
    figure.tight_layout()

    atomic_io.save_figure(path, figure, dpi=100)
    plt.close(figure)


def model_summary_text(model):
    """Format the layers of ``model`` as a plain-text table.

    Parameters
    ----------
    model : keras.Model
        A built functional model.

    Returns
    -------
    str
        One line per layer with its name, type, output shape and parameter
        count, then the total parameter count.
    """
    lines = [f"{'layer':<26} {'type':<18} {'output shape':<22} {'parameters':>12}"]
    for layer in model.layers:
        shape = str(tuple(layer.output.shape))
        lines.append(f"{layer.name:<26} {type(layer).__name__:<18} {shape:<22} {layer.count_params():>12,}")
    lines.append(f"total parameters: {model.count_params():,}")
    return "\n".join(lines)


def reconstruction_mse(model, crops, batch_size=256):
    """Compute the reconstruction error of each crop.

    Parameters
    ----------
    model : keras.Model
        Autoencoder.
    crops : (n, 100, 100, 1) uint8 ndarray
        Crops, 0 black to 255 white.
    batch_size : int
        Crops per prediction batch.

    Returns
    -------
    (n,) float64 ndarray
        Mean squared error between each crop and its reconstruction, with
        pixel values in [0, 1]. The crop itself is the reference, also for
        anomalous crops.
    """
    inputs = crops.astype(np.float32) / 255.0
    reconstructions = model.predict(inputs, batch_size=batch_size, verbose=0)
    return np.mean((reconstructions.astype(np.float64) - inputs) ** 2, axis=(1, 2, 3))


def evaluate_test_split(model, data_dir, classes):
    """Compute the mean reconstruction error per class on the test split.

    Parameters
    ----------
    model : keras.Model
        Autoencoder.
    data_dir : str
        Data set folder written by split_data.py.
    classes : sequence of str
        Classes to evaluate.

    Returns
    -------
    dict
        For each class, ``count`` (crops) and ``mean_loss`` (mean of
        ``reconstruction_mse``, None when there are no crops).
    """
    results = {}
    for class_name in classes:
        paths = list_class_files(data_dir, "test", class_name)
        losses = reconstruction_mse(model, read_crops(paths)) if paths else np.empty(0)
        results[class_name] = {
            "count": len(paths),
            "mean_loss": float(np.mean(losses)) if len(losses) else None,
        }
    return results


# ---------------------------------------------------------------------------
# Training


def _validate_training_arguments(model_name, architecture, epochs, batch_size, learning_rate, limits):
    if not model_name or os.sep in model_name or model_name.endswith(".keras"):
        raise ValueError(f"model_name must be a file name without folder or .keras extension, got {model_name!r}")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if learning_rate is not None and not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    for name, value in limits.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1 or None, got {value}")


def output_paths(output_dir, model_name):
    """Return the output file paths of a training run, keyed by kind."""
    return {
        "model": os.path.join(output_dir, f"{model_name}.keras"),
        "summary": os.path.join(output_dir, f"{model_name}_summary.txt"),
        "history": os.path.join(output_dir, f"{model_name}_history.csv"),
        "plot": os.path.join(output_dir, f"{model_name}_loss_vs_epochs.png"),
        "test_losses": os.path.join(output_dir, f"{model_name}_test_losses.json"),
    }


def _load_training_data(data_dir, classes, blank_label, max_train_normal, max_validation_normal, seed):
    if not os.path.isdir(data_dir):
        raise TrainingDataError(f"data folder {data_dir} not found; write it with split_data.py or pass --data_dir")

    train = load_split(data_dir, "train", classes, max_train_normal, seed)
    if blank_label:
        check_training_classes(train[1], data_dir)
    validation = load_split(data_dir, "validation", classes, max_validation_normal, seed + 1)
    for class_name in classes:
        list_class_files(data_dir, "test", class_name)
    return train, validation


def _counts(is_anomaly):
    return {"normal": int(np.sum(~is_anomaly)), "anomaly": int(np.sum(is_anomaly))}


def _write_summary(path, model, settings, results=None):
    lines = [f"MLography shape autoencoder: {model.name}", ""]
    lines += [f"{key}: {value}" for key, value in settings.items()]
    if results:
        lines.append("")
        lines += [f"{key}: {value}" for key, value in results.items()]
    lines += ["", model_summary_text(model), ""]
    atomic_io.write_text(path, "\n".join(lines))


def train_model(
    data_dir,
    output_dir,
    model_name,
    blank_label=True,
    architecture="compact",
    epochs=20,
    batch_size=32,
    learning_rate=None,
    seed=0,
    max_steps_per_epoch=None,
    max_train_normal=None,
    max_validation_normal=None,
    overwrite=False,
):
    """Train the shape autoencoder and write the model and its reports.

    Parameters
    ----------
    data_dir : str
        Data set folder written by split_data.py.
    output_dir : str
        Folder for the outputs (see ``output_paths``).
    model_name : str
        Base name of the output files.
    blank_label : bool
        If True, train on normal and anomalous crops, with an all-white
        target for the anomalous ones. If False, train on normal crops only.
    architecture : {"compact", "paper"}
        Network to train.
    epochs : int
        Number of epochs.
    batch_size : int
        Crops per training step.
    learning_rate : float, optional
        Adam learning rate; by default the value in
        ``DEFAULT_LEARNING_RATES`` for the architecture.
    seed : int
        Seed of the weights, the shuffling, the augmentation and the
        subsets.
    max_steps_per_epoch : int, optional
        If given, end each epoch after at most this many steps. The
        shuffled data carries on where the previous epoch stopped.
    max_train_normal, max_validation_normal : int, optional
        If given, use a random subset of at most this many normal crops of
        the train or validation split. Anomalous crops are all used.
    overwrite : bool
        If True, replace an existing ``NAME.keras`` in ``output_dir``.

    Returns
    -------
    dict
        ``paths`` (output files), ``counts`` (crops per split and class
        used), ``history`` (DataFrame), ``best_epoch``, ``best_val_loss``,
        ``seconds`` (training time) and ``test`` (see
        ``evaluate_test_split``).

    Raises
    ------
    ValueError
        On an invalid argument, a missing or empty data folder, or a
        training split without anomalous crops when ``blank_label`` is True.
    atomic_io.OutputError
        If ``NAME.keras`` exists and ``overwrite`` is False, or an output
        cannot be written.
    """
    limits = {
        "max_steps_per_epoch": max_steps_per_epoch,
        "max_train_normal": max_train_normal,
        "max_validation_normal": max_validation_normal,
    }
    _validate_training_arguments(model_name, architecture, epochs, batch_size, learning_rate, limits)
    if learning_rate is None:
        learning_rate = DEFAULT_LEARNING_RATES[architecture]
    paths = output_paths(output_dir, model_name)
    if os.path.exists(paths["model"]) and not overwrite:
        raise atomic_io.OutputError(f"model {paths['model']} exists; pass --overwrite to replace it")

    classes = CLASSES if blank_label else CLASSES[:1]
    train, validation = _load_training_data(
        data_dir, classes, blank_label, max_train_normal, max_validation_normal, seed
    )
    counts = {"train": _counts(train[1]), "validation": _counts(validation[1])}
    atomic_io.ensure_dir(output_dir)

    keras.utils.set_random_seed(seed)
    model = build_model(architecture)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")

    steps = math.ceil(len(train[0]) / batch_size)
    if max_steps_per_epoch:
        steps = min(steps, max_steps_per_epoch)
    train_data = make_dataset(
        train[0], train[1], batch_size, blank_label, build_augmenter(seed), shuffle_seed=seed, repeat=True
    )
    validation_data = make_dataset(validation[0], validation[1], batch_size, blank_label)

    settings = {
        "data_dir": os.path.abspath(data_dir),
        "architecture": architecture,
        "anomaly_blank_label": blank_label,
        "epochs": epochs,
        "batch_size": batch_size,
        "steps_per_epoch": steps,
        "learning_rate": learning_rate,
        "seed": seed,
        **{name: value for name, value in limits.items() if name != "max_steps_per_epoch"},
        "crops_used": counts,
        "parameters": model.count_params(),
    }
    _write_summary(paths["summary"], model, settings)
    logging.info("training %s on %s for %d epochs of %d steps", architecture, counts, epochs, steps)

    recorder = EpochRecorder(paths["model"], paths["history"])
    start = time.monotonic()
    model.fit(
        train_data,
        validation_data=validation_data,
        epochs=epochs,
        steps_per_epoch=steps,
        callbacks=[recorder],
        shuffle=False,
        verbose=0,
    )
    seconds = time.monotonic() - start

    history = recorder.history_frame()
    plot_losses(history, paths["plot"])

    best_model = keras.models.load_model(paths["model"], compile=False)
    test = evaluate_test_split(best_model, data_dir, classes)
    atomic_io.write_json(paths["test_losses"], {"loss": "mean squared error to the crop, pixels in [0, 1]", **test})
    logging.info("test split mean reconstruction loss: %s", test)

    results = {
        "training_seconds": round(seconds, 1),
        "best_epoch": recorder.best_epoch,
        "best_val_loss": recorder.best_loss,
        "test_mean_loss": test,
    }
    _write_summary(paths["summary"], best_model, settings, results)
    return {
        "paths": paths,
        "counts": counts,
        "history": history,
        "best_epoch": recorder.best_epoch,
        "best_val_loss": recorder.best_loss,
        "seconds": seconds,
        "test": test,
    }


# ---------------------------------------------------------------------------
# Command line

FLAGS = flags.FLAGS


def _define_flags():
    # Defined only when run as a script, so that importing this module
    # next to others that define absl flags of the same name works.
    flags.DEFINE_string("model_name", None, "Base name of the output files, without folder or extension.")
    flags.DEFINE_bool(
        "anomaly_blank_label", True, "Train anomalous crops towards an all-white target; False trains on normal only."
    )
    flags.DEFINE_string("data_dir", os.path.join("data", "shape"), "Data set folder written by split_data.py.")
    flags.DEFINE_string("output_dir", "models", "Folder for the model and its reports.")
    flags.DEFINE_enum("architecture", "compact", list(ARCHITECTURES), "Network to train.")
    flags.DEFINE_integer("epochs", 20, "Number of training epochs.")
    flags.DEFINE_integer("batch_size", 32, "Crops per training step.")
    flags.DEFINE_float("learning_rate", None, "Adam learning rate; default 1e-3 for compact, 1e-5 for paper.")
    flags.DEFINE_integer("seed", 0, "Seed of the weights, shuffling, augmentation and subsets.")
    flags.DEFINE_integer("max_steps_per_epoch", None, "End each epoch after at most this many steps.")
    flags.DEFINE_integer("max_train_normal", None, "Use a random subset of at most this many normal training crops.")
    flags.DEFINE_integer(
        "max_validation_normal", None, "Use a random subset of at most this many normal validation crops."
    )
    flags.DEFINE_bool("overwrite", False, "Replace an existing model file of the same name.")
    flags.mark_flag_as_required("model_name")


def main(argv):
    """Train from the command-line flags; return the exit code."""
    del argv
    try:
        train_model(
            FLAGS.data_dir,
            FLAGS.output_dir,
            FLAGS.model_name,
            blank_label=FLAGS.anomaly_blank_label,
            architecture=FLAGS.architecture,
            epochs=FLAGS.epochs,
            batch_size=FLAGS.batch_size,
            learning_rate=FLAGS.learning_rate,
            seed=FLAGS.seed,
            max_steps_per_epoch=FLAGS.max_steps_per_epoch,
            max_train_normal=FLAGS.max_train_normal,
            max_validation_normal=FLAGS.max_validation_normal,
            overwrite=FLAGS.overwrite,
        )
    except (ValueError, OSError) as error:
        logging.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    _define_flags()
    app.run(main)
