"""Tests of use_model: model loading, chunked inference, post-processing and loss."""

import contextlib
import os
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from use_model import (
    ModelLoadError,
    load_model,
    postprocess,
    predict,
    reconstruction_loss,
    reconstruction_losses,
)

# One TensorFlow thread keeps these tests light beside other jobs. The call
# raises when another test module started TensorFlow first, which is harmless.
with contextlib.suppress(RuntimeError):
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def tiny_autoencoder(input_side=100, seed=0):
    """Build a small convolutional model with input and output (side, side, 1)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((input_side, input_side, 1))
    hidden = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")(inputs)
    hidden = keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same", activation="relu")(hidden)
    outputs = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")(hidden)
    return keras.Model(inputs, outputs)


def identity_model():
    """Build a model whose output is its input, to check the input scaling."""
    inputs = keras.Input((100, 100, 1))
    return keras.Model(inputs, keras.layers.Rescaling(1.0)(inputs))


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    model = tiny_autoencoder()
    paths = {"keras": folder / "tiny.keras", "h5": folder / "tiny.h5"}
    model.save(paths["keras"])
    model.save(paths["h5"])
    small_input = tiny_autoencoder(input_side=28)
    paths["28x28"] = folder / "small_input.keras"
    small_input.save(paths["28x28"])
    return model, paths


def random_crops(count, seed=0):
    """Return crops with a dark disc of random size and place on white."""
    rng = np.random.default_rng(seed)
    crops = np.full((count, 100, 100), 255, np.uint8)
    for crop in crops:
        centre = tuple(int(v) for v in rng.integers(10, 90, 2))
        cv2.circle(crop, centre, int(rng.integers(3, 40)), 0, thickness=-1)
    return crops


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["keras", "h5"])
def test_load_model_formats(saved_models, kind):
    model, paths = saved_models
    loaded = load_model(paths[kind])
    assert loaded.input_shape == (None, 100, 100, 1)
    crops = random_crops(3)
    assert np.allclose(predict(loaded, crops), predict(model, crops), atol=1e-6)


def test_load_model_missing_file(tmp_path):
    path = tmp_path / "absent.keras"
    with pytest.raises(ModelLoadError, match="not found") as error:
        load_model(path)
    assert str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_load_model_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="directory"):
        load_model(tmp_path)


@pytest.mark.parametrize("extension", [".keras", ".h5"])
def test_load_model_text_file(tmp_path, extension):
    path = tmp_path / f"notes{extension}"
    path.write_text("this is not a model\n")
    with pytest.raises(ModelLoadError, match="is not a Keras model") as error:
        load_model(path)
    assert str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_load_model_zip_without_model(tmp_path):
    path = tmp_path / "archive.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "no model here")
    with pytest.raises(ModelLoadError, match="cannot load model") as error:
        load_model(path)
    assert str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_load_model_wrong_extension(tmp_path):
    path = tmp_path / "model.txt"
    path.write_text("x")
    with pytest.raises(ModelLoadError, match=".keras or .h5"):
        load_model(path)


def test_load_model_wrong_input_shape(saved_models):
    _, paths = saved_models
    with pytest.raises(ModelLoadError, match="input shape") as error:
        load_model(paths["28x28"])
    assert str(paths["28x28"]) in str(error.value)
    assert "(None, 28, 28, 1)" in str(error.value)


def test_load_model_wrong_output_shape(tmp_path):
    inputs = keras.Input((100, 100, 1))
    flat = keras.Model(inputs, keras.layers.Flatten()(inputs))
    path = tmp_path / "flat.keras"
    flat.save(path)

    with pytest.raises(ModelLoadError, match="output shape") as error:
        load_model(path)
    assert str(path) in str(error.value)
    assert "(None, 10000)" in str(error.value)


def test_model_load_error_is_value_error():
    assert issubclass(ModelLoadError, ValueError)


# ---------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------


def test_predict_scales_input():
    crops = random_crops(5)
    crops[0, 0, :4] = [0, 1, 128, 255]
    predictions = predict(identity_model(), crops)
    assert predictions.dtype == np.float32
    assert predictions.shape == (5, 100, 100)
    # Scaled by multiplication with float32(1 / 255), which is within one
    # float32 step of the division by 255.
    expected = crops.astype(np.float32) * np.float32(1 / 255)
    assert np.array_equal(predictions, expected)
    assert np.allclose(predictions, crops / 255.0, rtol=1e-7, atol=0)


def test_predict_empty():
    predictions = predict(identity_model(), np.empty((0, 100, 100), np.uint8))
    assert predictions.shape == (0, 100, 100)
    assert predictions.dtype == np.float32


def test_predict_chunks_match(saved_models):
    model, _ = saved_models
    crops = random_crops(600)

    chunked = predict(model, crops, batch_size=256)
    per_chunk = np.concatenate([predict(model, crops[start : start + 256], batch_size=256) for start in (0, 256, 512)])
    one_call = predict(model, crops, batch_size=600)

    assert chunked.shape == (600, 100, 100)
    assert np.array_equal(chunked, per_chunk)
    assert np.allclose(chunked, one_call, atol=1e-6)


def test_predict_rejects_bad_crops():
    with pytest.raises(ValueError, match="crops"):
        predict(identity_model(), np.zeros((2, 100, 100), np.float32))
    with pytest.raises(ValueError, match="crops"):
        predict(identity_model(), np.zeros((2, 100, 100, 1), np.uint8))
    with pytest.raises(ValueError, match="batch_size"):
        predict(identity_model(), np.zeros((2, 100, 100), np.uint8), batch_size=0)


# ---------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------


def postprocess_one_by_one(predictions):
    """Apply the reference steps to each prediction on its own."""
    kernel = np.ones((3, 3), np.uint8)
    results = []
    for prediction in predictions.astype(np.float32):
        _, binary = cv2.threshold(255 - 255 * prediction, 100, 255, cv2.THRESH_BINARY_INV)
        binary = cv2.dilate(binary, kernel, iterations=3)
        results.append(cv2.erode(binary, kernel, iterations=3))
    return np.stack(results)


def test_postprocess_hand_case():
    prediction = np.ones((1, 100, 100), np.float32)
    prediction[0, 20:40, 20:40] = 0.0  # 20 x 20 impurity: kept
    prediction[0, 60:90, 60:66] = 0.0  # 6 px wide line: removed
    prediction[0, 10, 80] = 0.0  # single pixel: removed

    result = postprocess(prediction)[0]

    expected = np.full((100, 100), 255, np.uint8)
    expected[20:40, 20:40] = 0
    assert result.dtype == np.uint8
    assert np.array_equal(result, expected)


def test_postprocess_keeps_7px_line():
    prediction = np.ones((1, 100, 100), np.float32)
    prediction[0, 60:90, 60:67] = 0.0
    assert (postprocess(prediction)[0, 60:90, 60:67] == 0).all()


def test_postprocess_threshold_boundary():
    # 255 - 255 * 0.6 = 102 > 100 is impurity; 255 - 255 * 0.61 = 99.45 is background.
    prediction = np.ones((2, 100, 100), np.float32)
    prediction[0, 30:60, 30:60] = 0.6
    prediction[1, 30:60, 30:60] = 0.61
    result = postprocess(prediction)
    assert (result[0, 30:60, 30:60] == 0).all()
    assert (result[1] == 255).all()


def test_postprocess_stack_matches_one_by_one():
    # Noise up to the crop edges would leak between crops if the gaps were wrong.
    rng = np.random.default_rng(7)
    predictions = (rng.random((40, 100, 100)) > 0.3).astype(np.float32)
    predictions[::2, :5] = 0.0
    predictions[1::2, -5:] = 0.0

    assert np.array_equal(postprocess(predictions), postprocess_one_by_one(predictions))


def test_postprocess_empty():
    assert postprocess(np.empty((0, 100, 100), np.float32)).shape == (0, 100, 100)


# ---------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------


def square_crop():
    """Return a white crop with a black 10 x 10 px square: 100 black, 9,900 white pixels."""
    crop = np.full((1, 100, 100), 255, np.uint8)
    crop[0, 45:55, 45:55] = 0
    return crop


def test_loss_lost_impurity_both_modes():
    # The reconstruction is all background (255).
    crop = square_crop()
    post = np.full((1, 100, 100), 255, np.uint8)

    reference = reconstruction_loss(crop, post, mode="reference")
    consistent = reconstruction_loss(crop, post, mode="consistent")

    # Reference: 100 px of (0 - 255)^2 and 9,900 px of (1 - 255)^2.
    assert reference[0] == pytest.approx((100 * 255**2 + 9900 * 254**2) / 10000, rel=1e-15)
    # Consistent: 100 px of (0 - 1)^2.
    assert consistent[0] == pytest.approx(0.01, rel=1e-15)


def test_loss_perfect_reconstruction_both_modes():
    crop = square_crop()
    post = crop.copy()

    assert reconstruction_loss(crop, post, mode="consistent")[0] == 0.0
    # Reference: the 9,900 white pixels still cost (1 - 255)^2 each.
    assert reconstruction_loss(crop, post)[0] == pytest.approx(9900 * 254**2 / 10000, rel=1e-15)


def test_loss_reference_tracks_white_count():
    # Any input gives a reference loss between 254^2 and 255^2 times the
    # white fraction of the reconstruction, plus at most 1.
    crops = random_crops(20, seed=1)
    posts = random_crops(20, seed=2)
    white_fraction = (posts == 255).mean(axis=(1, 2))

    losses = reconstruction_loss(crops, posts)

    assert (losses >= 254**2 * white_fraction).all()
    assert (losses <= 255**2 * white_fraction + 1).all()


def test_loss_rejects_unknown_mode():
    crop = square_crop()
    with pytest.raises(ValueError, match="'mse'") as error:
        reconstruction_loss(crop, crop, mode="mse")
    assert "'reference'" in str(error.value)
    assert "'consistent'" in str(error.value)
    with pytest.raises(ValueError, match="'mse'"):
        reconstruction_losses(identity_model(), crop, mode="mse")


def test_loss_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="postprocessed"):
        reconstruction_loss(square_crop(), np.zeros((2, 100, 100), np.uint8))


@pytest.mark.parametrize("mode", ["reference", "consistent"])
def test_reconstruction_losses_pipeline(saved_models, mode):
    model, _ = saved_models
    crops = random_crops(300, seed=4)

    losses = reconstruction_losses(model, crops, mode=mode, batch_size=128)
    expected = reconstruction_loss(crops, postprocess(predict(model, crops, batch_size=128)), mode)

    assert losses.shape == (300,)
    assert np.array_equal(losses, expected)


def test_reconstruction_losses_empty():
    losses = reconstruction_losses(identity_model(), np.empty((0, 100, 100), np.uint8))
    assert losses.shape == (0,)

