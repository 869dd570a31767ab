"""Run the shape autoencoder on impurity crops and measure its reconstruction loss.

The autoencoder is trained on crops of round impurities (see
``shape_anomaly.prepare_training_data``), so it reconstructs round shapes
well and irregular shapes badly. The loss of each crop is the mean squared
error between the crop and the post-processed reconstruction.

Keras is imported only inside the functions that need it, so importing this
module does not start TensorFlow.
"""

import logging
import os
import zipfile

import cv2
import numpy as np

logger = logging.getLogger(__name__)

#: Input shape that the autoencoder must accept, batch dimension first.
MODEL_INPUT_SHAPE = (None, 100, 100, 1)

#: Output shapes that :func:`predict` accepts: the input shape, with or
#: without the channel axis.
_MODEL_OUTPUT_SHAPES = (MODEL_INPUT_SHAPE, MODEL_INPUT_SHAPE[:3])

#: Side of a crop, in px.
CROP_SIZE = 100

#: Crops per ``predict_on_batch`` call, which bounds memory: calling the
#: model on 2,000 crops in one call was reported to take 7.9 GB.
DEFAULT_BATCH_SIZE = 256

#: Gray level, on the inverted 0..255 prediction, above which a pixel
#: becomes impurity (0) and at or below which it becomes background (255).
BINARY_THRESHOLD = 100

#: Iterations of the 3x3 dilation and of the 3x3 erosion that follow it.
MORPHOLOGY_ITERATIONS = 3

#: Rows between stacked crops during the morphology. The 3 dilations and
#: the 3 erosions each reach 3 px, so a 3-row gap holding the neutral value
#: of each operation keeps neighbouring crops apart.
_GAP_ROWS = MORPHOLOGY_ITERATIONS

_KERNEL_3X3 = np.ones((3, 3), np.uint8)

#: Allowed values of the ``mode`` argument of the loss functions.
LOSS_MODES = ("reference", "consistent")

_MODEL_EXTENSIONS = (".keras", ".h5")

_SAVE_HINT = "pass a model that the training step saved with model.save()"


class ModelLoadError(ValueError):
    """Raised when a file cannot be used as the shape autoencoder."""


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _check_model_path(path):
    if not os.path.exists(path):
        raise ModelLoadError(f"model file not found: {path}; pass the path of a trained .keras or .h5 model")
    if os.path.isdir(path):
        raise ModelLoadError(
            f"model path is a directory, not a file: {path}; pass the .keras or .h5 file of the model"
        )
    extension = os.path.splitext(path)[1].lower()
    if extension not in _MODEL_EXTENSIONS:
        raise ModelLoadError(
            f"model file {path} has extension {extension or '(none)'!r}; "
            "save the model with model.save() as .keras or .h5"
        )

    # Keras reports a .keras file that is not a zip archive as "File not
    # found", so check the container format first.
    if extension == ".keras" and not zipfile.is_zipfile(path):
        raise ModelLoadError(
            f"model file {path} is not a Keras model (a .keras file is a zip archive); "
            f"{_SAVE_HINT}"
        )
    if extension == ".h5" and not _is_hdf5(path):
        raise ModelLoadError(
            f"model file {path} is not a Keras model (an .h5 file is an HDF5 file); {_SAVE_HINT}"
        )


def _is_hdf5(path):
    import h5py

    return h5py.is_hdf5(path)


def _one_line(error):
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def load_model(path):
    """Load the shape autoencoder from a ``.keras`` or ``.h5`` file.

    The model is loaded with ``compile=False`` because only inference is
    needed.

    Parameters
    ----------
    path : str or os.PathLike
        Path of the saved model.

    Returns
    -------
    keras.Model
        A model whose input shape is ``(None, 100, 100, 1)``.

    Raises
    ------
    ModelLoadError
        If the file is missing, is a directory, has another extension, is
        not a Keras model, or the model's input shape is not
        ``(None, 100, 100, 1)`` or its output shape is neither that nor
        ``(None, 100, 100)``. The message is one line that names the
        file and the fix.
    """
    import keras

    path = os.fspath(path)
    _check_model_path(path)

    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001 - Keras raises many types for a bad file
        raise ModelLoadError(
            f"cannot load model {path}: {_one_line(error)}; {_SAVE_HINT}"
        ) from error

    input_shape = getattr(model, "input_shape", None)
    if input_shape is None or tuple(input_shape) != MODEL_INPUT_SHAPE:
        raise ModelLoadError(
            f"model {path} has input shape {input_shape}, but the crops need "
            f"{MODEL_INPUT_SHAPE}; pass a model trained on 100x100 gray crops"
        )
    output_shape = getattr(model, "output_shape", None)
    if output_shape is None or tuple(output_shape) not in _MODEL_OUTPUT_SHAPES:
        raise ModelLoadError(
            f"model {path} has output shape {output_shape}, but the reconstruction loss needs "
            f"{MODEL_INPUT_SHAPE}; pass an autoencoder that reconstructs its input"
        )

    logger.info("loaded shape model %s (%d parameters)", path, model.count_params())
    return model


# ---------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------


def _validate_crops(crops):
    crops = np.asarray(crops)
    if crops.ndim != 3 or crops.shape[1:] != (CROP_SIZE, CROP_SIZE) or crops.dtype != np.uint8:
        raise ValueError(
            f"crops must be a (N, {CROP_SIZE}, {CROP_SIZE}) uint8 array of gray levels 0..255, "
            f"got shape {crops.shape} and dtype {crops.dtype}"
        )
    return crops


def _validate_batch_size(batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def _model_input(crops):
    """Scale uint8 crops to float32 0..1 with a channel axis: (N, 100, 100, 1).

    The crops are multiplied by float32(1 / 255), as Keras's
    ``ImageDataGenerator(rescale=1 / 255)`` does in the public MLography
    code. For 126 of the 256 gray levels this differs from a division by
    255 in the last bit.
    """
    return (crops.astype(np.float32) * np.float32(1.0 / 255.0))[..., np.newaxis]


def _predict_chunk(model, crops):
    output = np.asarray(model.predict_on_batch(_model_input(crops)))
    if output.shape not in ((len(crops), CROP_SIZE, CROP_SIZE, 1), (len(crops), CROP_SIZE, CROP_SIZE)):
        raise ValueError(
            f"model output has shape {output.shape}, expected ({len(crops)}, {CROP_SIZE}, {CROP_SIZE}, 1); "
            "pass an autoencoder that reconstructs its input"
        )
    return output.reshape(len(crops), CROP_SIZE, CROP_SIZE).astype(np.float32, copy=False)


def predict(model, crops, batch_size=DEFAULT_BATCH_SIZE):
    """Reconstruct crops with the autoencoder, ``batch_size`` crops per call.

    Parameters
    ----------
    model : keras.Model
        Model from :func:`load_model`.
    crops : (N, 100, 100) uint8 ndarray
        Crops from ``shape_anomaly.impurity_crops``, gray levels 0..255.
        They are scaled to 0..1 and given a channel axis before inference.
    batch_size : int
        Crops per ``model.predict_on_batch`` call. It bounds memory: the
        result does not depend on it beyond float32 rounding.

    Returns
    -------
    (N, 100, 100) float32 ndarray
        The reconstructions as the model outputs them, 0..1 for a sigmoid
        output layer. An empty array when N is 0.
    """
    crops = _validate_crops(crops)
    batch_size = _validate_batch_size(batch_size)

    predictions = np.empty((len(crops), CROP_SIZE, CROP_SIZE), dtype=np.float32)
    for start in range(0, len(crops), batch_size):
        stop = min(start + batch_size, len(crops))
        predictions[start:stop] = _predict_chunk(model, crops[start:stop])
    return predictions


# ---------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------


def _stack_with_gaps(images, gap_value):
    """Stack (N, h, w) images into one (N * (h + 3), w) image, each followed by 3 gap rows."""
    count, height, width = images.shape
    stacked = np.full((count, height + _GAP_ROWS, width), gap_value, dtype=images.dtype)
    stacked[:, :height] = images
    return stacked.reshape(count * (height + _GAP_ROWS), width)


def _crop_view(stacked, count):
    """Return a (N, h + 3, w) view of a stacked image, gap rows last in each crop."""
    return stacked.reshape(count, -1, stacked.shape[1])


def postprocess(predictions):
    """Binarise reconstructions and remove small specks, as the published MLography code does.

    Each prediction ``p`` becomes ``255 - 255 * p`` (float32), which is
    thresholded with ``cv2.THRESH_BINARY_INV`` at 100, so pixels with
    ``p`` above about 0.608 become background (255) and the others impurity
    (0). Then 3 dilations and 3 erosions with a 3x3 ones kernel follow,
    which is a closing of the background: impurity parts that a 7x7 px
    square does not fit in (specks, lines up to 6 px wide) become
    background.

    All crops are processed as one image, stacked with 3-px gaps. Before
    the dilation the gaps are 0 and before the erosion 255, the neutral
    values of each operation, so the result equals processing each crop on
    its own with OpenCV's default border.

    Parameters
    ----------
    predictions : (N, 100, 100) float ndarray
        Reconstructions from :func:`predict`.

    Returns
    -------
    (N, h, w) uint8 ndarray
        0 on impurity pixels and 255 on background pixels.
    """
    predictions = np.asarray(predictions, dtype=np.float32)
    if predictions.ndim != 3:
        raise ValueError(f"predictions must have shape (N, h, w), got {predictions.shape}")
    count, height, _ = predictions.shape
    if count == 0:
        return np.empty(predictions.shape, dtype=np.uint8)

    inverted = np.float32(255) - np.float32(255) * predictions
    stacked = _stack_with_gaps(inverted, gap_value=0)

    _, binary = cv2.threshold(stacked, BINARY_THRESHOLD, 255, cv2.THRESH_BINARY_INV)

    # The thresholded image holds only 0 and 255, so uint8 is exact. It
    # made the morphology of 1,258 crops 4.6 times faster than float32
    # (OpenCV 5.1, 2 cores).
    binary = binary.astype(np.uint8)
    _crop_view(binary, count)[:, height:] = 0
    dilated = cv2.dilate(binary, _KERNEL_3X3, iterations=MORPHOLOGY_ITERATIONS)

    _crop_view(dilated, count)[:, height:] = 255
    eroded = cv2.erode(dilated, _KERNEL_3X3, iterations=MORPHOLOGY_ITERATIONS)

    return np.ascontiguousarray(_crop_view(eroded, count)[:, :height])


# ---------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------


def _validate_mode(mode):
    if mode not in LOSS_MODES:
        raise ValueError(f"mode must be 'reference' or 'consistent', got {mode!r}")
    return mode


def reconstruction_loss(crops, postprocessed, mode="reference"):
    """Compute the mean squared error between each crop and its post-processed reconstruction.

    The crop always enters on the 0..1 scale (gray level / 255).

    ``mode="reference"`` keeps the post-processed image on its 0..255
    scale, as the published MLography code does. The two images are then on
    different scales: a background pixel of the reconstruction (255)
    contributes between 254^2 = 64,516 and 255^2 = 65,025, and an impurity
    pixel (0) at most 1. The loss is therefore about 65,000 times the
    fraction of background pixels in the post-processed reconstruction,
    whatever the input crop is: a smaller reconstructed impurity means a
    higher loss. The input decides only the spread within that band and
    the at most 1 per impurity pixel.

    ``mode="consistent"`` puts both on the 0..1 scale, so the loss is the
    fraction of pixels where the two binary shapes differ, plus the
    anti-aliasing gray levels at the crop's edges.

    Parameters
    ----------
    crops : (N, 100, 100) uint8 ndarray
        Input crops, gray levels 0..255.
    postprocessed : (N, 100, 100) array_like
        Output of :func:`postprocess`, values 0 or 255.
    mode : {"reference", "consistent"}
        Scale of the post-processed image, see above.

    Returns
    -------
    (N,) float64 ndarray
        Loss per crop.
    """
    mode = _validate_mode(mode)
    crops = _validate_crops(crops)
    postprocessed = np.asarray(postprocessed)
    if postprocessed.shape != crops.shape:
        raise ValueError(f"postprocessed must have shape {crops.shape} to match crops, got {postprocessed.shape}")

    # float32 division, as the crop was scaled before the loss in the public
    # MLography code; the difference is then taken in float64.
    inputs = (crops.astype(np.float32) / np.float32(255.0)).astype(np.float64)
    if mode == "reference":
        difference = inputs - postprocessed
    else:
        difference = inputs - postprocessed / 255.0

    pixels_per_crop = crops.shape[1] * crops.shape[2]
    return np.einsum("nij,nij->n", difference, difference) / pixels_per_crop


def reconstruction_losses(model, crops, mode="reference", batch_size=DEFAULT_BATCH_SIZE):
    """Predict, post-process and compute the loss of every crop, one chunk at a time.

    Parameters
    ----------
    model : keras.Model
        Model from :func:`load_model`.
    crops : (N, 100, 100) uint8 ndarray
        Crops from ``shape_anomaly.impurity_crops``.
    mode : {"reference", "consistent"}
        Loss scale, see :func:`reconstruction_loss`.
    batch_size : int
        Crops per model call.

    Returns
    -------
    (N,) float64 ndarray
        Loss per crop; empty when N is 0.
    """
    mode = _validate_mode(mode)
    crops = _validate_crops(crops)
    batch_size = _validate_batch_size(batch_size)

    losses = np.empty(len(crops), dtype=np.float64)
    for start in range(0, len(crops), batch_size):
        chunk = crops[start : start + batch_size]
        postprocessed = postprocess(predict(model, chunk, batch_size))
        losses[start : start + len(chunk)] = reconstruction_loss(chunk, postprocessed, mode)
    return losses
