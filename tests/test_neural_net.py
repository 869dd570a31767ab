"""Tests of neural_net: data pipeline, blank label, architectures and a short training run.

The training test fits the compact model for 2 epochs of 2 steps on 36
generated crops (filled discs are normal, crosses are anomalous), enough to
run every step of training and every output writer.
"""

import io
import json
import math
import os
import subprocess
import sys
import zipfile

import cv2
import h5py
import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import atomic_io
import neural_net
from neural_net import TrainingDataError
from split_data import split_dataset

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Parameter count of the published architecture: 8 convolutions
#: (6,656 + 7 x 1,638,656), Dense 56*56*256 -> 500 (401,408,500) and
#: Dense 500 -> 10,000 (5,010,000).
PAPER_PARAMETERS = 417_895_748


def _disc(rng):
    image = np.full((100, 100), 255, np.uint8)
    center = tuple(int(v) for v in rng.integers(40, 61, 2))
    cv2.circle(image, center, int(rng.integers(12, 35)), 0, -1)
    return image


def _cross(rng):
    image = np.full((100, 100), 255, np.uint8)
    width = int(rng.integers(4, 9))
    cv2.line(image, (15, 50), (85, 50), 0, width)
    cv2.line(image, (50, 15), (50, 85), 0, width)
    return image


def _write_generated_crops(folder, n_normal, n_anomaly, seed=0):
    rng = np.random.default_rng(seed)
    for class_name, count, draw, ratio in (("normal", n_normal, _disc, 0.1), ("anomaly", n_anomaly, _cross, 0.8)):
        class_dir = folder / class_name
        class_dir.mkdir(parents=True)
        for index in range(count):
            scan = f"scan1tag-{index % 3}"
            cv2.imwrite(str(class_dir / f"{ratio}{scan}_impurity_{index}.png"), draw(rng))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Two-class data set of 24 normal and 12 anomalous generated crops."""
    root = tmp_path_factory.mktemp("crops")
    _write_generated_crops(root / "rescaled", 24, 12)
    split_dataset(root / "rescaled", root, "shape", n_classes=2, seed=0)
    return root / "shape"


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """Result of a 2-epoch training run of the compact model."""
    output_dir = tmp_path_factory.mktemp("models")
    return neural_net.train_model(
        data_dir,
        output_dir,
        "tiny",
        blank_label=True,
        epochs=2,
        batch_size=8,
        seed=0,
        max_steps_per_epoch=2,
    )


# ---------------------------------------------------------------------------
# Training run and its outputs


def test_train_writes_loadable_model(trained):
    model = keras.models.load_model(trained["paths"]["model"], compile=False)

    assert model.input_shape == (None, 100, 100, 1)
    assert model.output_shape == (None, 100, 100, 1)


def test_train_model_has_no_optimizer_state(trained):
    with zipfile.ZipFile(trained["paths"]["model"]) as archive:
        config = json.loads(archive.read("config.json"))
        weights = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")

    assert not config.get("compile_config")
    assert "optimizer" not in weights


def test_train_history_csv(trained):
    history = pd.read_csv(trained["paths"]["history"])

    assert list(history.columns) == ["epoch", "loss", "val_loss", "seconds"]
    assert history["epoch"].tolist() == [1, 2]
    assert np.all(np.isfinite(history[["loss", "val_loss"]].to_numpy()))
    assert trained["best_val_loss"] == history["val_loss"].min()


def test_train_loss_plot(trained):
    image = cv2.imread(trained["paths"]["plot"])

    assert image is not None
    assert image.shape[0] > 100
    assert image.shape[1] > 100


def test_train_summary_text(trained):
    with open(trained["paths"]["summary"], encoding="utf-8") as handle:
        text = handle.read()

    assert "architecture: compact" in text
    assert "anomaly_blank_label: True" in text
    assert "training_seconds:" in text
    assert "total parameters: " in text


def test_train_test_losses(trained, data_dir):
    with open(trained["paths"]["test_losses"], encoding="utf-8") as handle:
        report = json.load(handle)

    for class_name in ("normal", "anomaly"):
        expected_count = len(os.listdir(data_dir / "test" / class_name))
        assert report[class_name]["count"] == expected_count
        assert 0 <= report[class_name]["mean_loss"] <= 1


def test_train_counts(trained):
    assert trained["counts"] == {
        "train": {"normal": 14, "anomaly": 7},
        "validation": {"normal": 5, "anomaly": 3},
    }


def test_train_refuses_existing_model(trained, data_dir):
    output_dir = os.path.dirname(trained["paths"]["model"])

    with pytest.raises(atomic_io.OutputError, match="tiny.keras exists; pass --overwrite"):
        neural_net.train_model(data_dir, output_dir, "tiny", epochs=1)


def test_test_losses_match_model(trained, data_dir):
    model = keras.models.load_model(trained["paths"]["model"], compile=False)
    paths = neural_net.list_class_files(data_dir, "test", "normal")

    losses = neural_net.reconstruction_mse(model, neural_net.read_crops(paths))

    assert np.isclose(losses.mean(), trained["test"]["normal"]["mean_loss"], rtol=1e-6)


# ---------------------------------------------------------------------------
# Targets and augmentation


def test_blank_label_targets():
    inputs = tf.random.uniform((4, 100, 100, 1), seed=1)
    is_anomaly = tf.constant([False, True, False, True])

    targets = neural_net.make_targets(inputs, is_anomaly, blank_label=True).numpy()

    assert np.all(targets[[1, 3]] == 1.0)
    assert np.array_equal(targets[[0, 2]], inputs.numpy()[[0, 2]])


def test_without_blank_label_targets_are_inputs():
    inputs = tf.random.uniform((2, 100, 100, 1), seed=1)

    targets = neural_net.make_targets(inputs, tf.constant([False, True]), blank_label=False)

    assert np.array_equal(targets.numpy(), inputs.numpy())


def test_augmented_pairs_aligned():
    rng = np.random.default_rng(1)
    crops = np.stack([_disc(rng) for _ in range(6)] + [_cross(rng) for _ in range(2)])[..., None]
    is_anomaly = np.array([False] * 6 + [True] * 2)
    dataset = neural_net.make_dataset(crops, is_anomaly, 8, True, neural_net.build_augmenter(5), shuffle_seed=None)

    inputs, targets = (array.numpy() for array in next(iter(dataset)))

    assert np.array_equal(targets[:6], inputs[:6])
    assert np.all(targets[6:] == 1.0)
    assert inputs.min() >= 0.0
    assert inputs.max() <= 1.0


def test_augmentation_transforms_crops():
    crop = np.full((100, 100), 255, np.uint8)
    crop[10:30, 40:90] = 0
    crops = np.repeat(crop[None, ..., None], 8, axis=0)
    dataset = neural_net.make_dataset(crops, np.zeros(8, bool), 8, True, neural_net.build_augmenter(5))

    inputs = next(iter(dataset))[0].numpy()

    changed = [not np.allclose(image[..., 0], crop / 255.0) for image in inputs]
    assert sum(changed) >= 6
    # Corners rotated in from outside the crop are white, so the dark area
    # stays near its 1,000 px (bilinear interpolation blurs its edge).
    dark_pixels = (inputs < 0.5).sum(axis=(1, 2, 3))
    assert np.all(np.abs(dark_pixels - 1000) < 150)


def test_make_dataset_scales_to_unit_range():
    crops = np.array([[[[0]] * 100] * 100, [[[255]] * 100] * 100], dtype=np.uint8)

    inputs, _ = next(iter(neural_net.make_dataset(crops, np.zeros(2, bool), 2, False)))

    assert inputs.numpy()[0].max() == 0.0
    assert inputs.numpy()[1].min() == 1.0


# ---------------------------------------------------------------------------
# Architectures


def test_compact_model_shape():
    model = neural_net.build_model("compact")

    assert model.input_shape == (None, 100, 100, 1)
    assert model.output_shape == (None, 100, 100, 1)
    assert model.count_params() == 125_577


def _layer_parameters(layer, input_shape):
    if isinstance(layer, keras.layers.Conv2D):
        return math.prod(layer.kernel_size) * input_shape[-1] * layer.filters + layer.filters
    if isinstance(layer, keras.layers.Dense):
        return input_shape[-1] * layer.units + layer.units
    assert isinstance(
        layer, (keras.layers.MaxPooling2D, keras.layers.UpSampling2D, keras.layers.Flatten, keras.layers.Reshape)
    )
    return 0


def test_paper_layers_shape_and_parameters():
    # Building the model allocates 1.7 GB of weights, so this walks the
    # unbuilt layers with Keras shape inference and counts weights per layer.
    shape = (None, 100, 100, 1)
    total = 0
    for layer in neural_net.paper_layers():
        total += _layer_parameters(layer, shape)
        shape = layer.compute_output_shape(shape)

    assert tuple(shape) == (None, 100, 100, 1)
    assert total == PAPER_PARAMETERS


@pytest.mark.skipif(
    os.environ.get("MLOGRAPHY_HEAVY_TESTS") != "1", reason="builds a 418M-parameter model; set MLOGRAPHY_HEAVY_TESTS=1"
)
def test_paper_model_built():
    model = neural_net.build_model("paper")

    assert model.output_shape == (None, 100, 100, 1)
    assert model.count_params() == PAPER_PARAMETERS


def test_unknown_architecture():
    with pytest.raises(ValueError, match="'dense'"):
        neural_net.build_model("dense")


# ---------------------------------------------------------------------------
# Checkpoint


def test_checkpoint_survives_failed_save(tmp_path, monkeypatch):
    model = neural_net.build_compact_model()
    recorder = neural_net.EpochRecorder(str(tmp_path / "m.keras"), str(tmp_path / "m_history.csv"))
    recorder.set_model(model)
    recorder.on_epoch_begin(0)
    recorder.on_epoch_end(0, {"loss": 0.5, "val_loss": 0.4})
    saved = (tmp_path / "m.keras").read_bytes()

    def failing_save(self, path, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(keras.Model, "save", failing_save)
    recorder.on_epoch_begin(1)
    with pytest.raises(KeyboardInterrupt):
        recorder.on_epoch_end(1, {"loss": 0.3, "val_loss": 0.2})

    assert (tmp_path / "m.keras").read_bytes() == saved
    assert sorted(os.listdir(tmp_path)) == ["m.keras", "m_history.csv"]


def test_checkpoint_keeps_best_epoch(tmp_path):
    recorder = neural_net.EpochRecorder(str(tmp_path / "m.keras"), str(tmp_path / "m_history.csv"))
    recorder.set_model(neural_net.build_compact_model())
    for epoch, val_loss in enumerate([0.4, 0.3, 0.35]):
        recorder.on_epoch_begin(epoch)
        recorder.on_epoch_end(epoch, {"loss": 0.5, "val_loss": val_loss})

    assert recorder.best_epoch == 2
    assert len(pd.read_csv(tmp_path / "m_history.csv")) == 3


# ---------------------------------------------------------------------------
# Input errors


def test_missing_data_dir(tmp_path):
    with pytest.raises(TrainingDataError, match="missing not found"):
        neural_net.train_model(tmp_path / "missing", tmp_path, "m", epochs=1)


def test_missing_split_folder(data_dir, tmp_path):
    copy = tmp_path / "shape"
    split_dataset(data_dir.parent / "rescaled", tmp_path, "shape", n_classes=1)
    os.rename(copy / "validation", copy / "held_out")

    with pytest.raises(TrainingDataError, match=r"validation/normal not found"):
        neural_net.train_model(copy, tmp_path / "out", "m", blank_label=False, epochs=1)


def test_one_class_data_with_blank_label(data_dir, tmp_path):
    split_dataset(data_dir.parent / "rescaled", tmp_path, "shape", n_classes=1)

    with pytest.raises(TrainingDataError, match=r"train/anomaly not found"):
        neural_net.train_model(tmp_path / "shape", tmp_path / "out", "m", blank_label=True, epochs=1)


def test_empty_anomaly_folder_with_blank_label(data_dir, tmp_path):
    split_dataset(data_dir.parent / "rescaled", tmp_path, "shape", n_classes=2)
    for path in (tmp_path / "shape" / "train" / "anomaly").iterdir():
        path.unlink()

    with pytest.raises(TrainingDataError, match=r"train/anomaly contains no crops"):
        neural_net.train_model(tmp_path / "shape", tmp_path / "out", "m", blank_label=True, epochs=1)


def test_wrong_crop_size(tmp_path):
    path = tmp_path / "small.png"
    cv2.imwrite(str(path), np.zeros((50, 60), np.uint8))

    with pytest.raises(TrainingDataError, match=r"60x50 px, expected 100x100"):
        neural_net.read_crops([str(path)])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model_name": "a/b"}, "model_name"),
        ({"architecture": "dense"}, "'dense'"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"max_steps_per_epoch": 0}, "max_steps_per_epoch"),
        ({"max_train_normal": -1}, "max_train_normal"),
        ({"max_validation_normal": 0}, "max_validation_normal"),
    ],
)
def test_invalid_training_arguments(tmp_path, kwargs, message):
    arguments = {"model_name": "m", **kwargs}

    with pytest.raises(ValueError, match=message):
        neural_net.train_model(tmp_path, tmp_path, **arguments)


def test_cli_error_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "neural_net.py", "--model_name=m", f"--data_dir={tmp_path / 'missing'}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "missing not found" in result.stderr
