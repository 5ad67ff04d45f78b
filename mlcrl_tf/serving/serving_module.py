"""The exported object: the inference model and its serving functions."""

import tensorflow as tf

from mlcrl_tf.serving import contract
from mlcrl_tf.serving import request_checks


class _Untracked:
    """Holds the Keras model out of the SavedModel's object graph."""

    def __init__(self, model):
        self.model = model


class ServingModule(tf.Module):
    """The exported object: the inference model and its serving functions.

    Only the variables captured by the serving functions are tracked
    (`model_variables`), never the Keras training model, so no projector
    weight can reach the SavedModel. Tracking the captured tf.Variables
    themselves (not Keras's wrappers) is also what makes the export load in
    TF1-style sessions, the way TF Serving loads it.

    Args:
        inference_model: `MLCRLModel.inference_model` (RGB images -> logits;
            it normalises its input itself).
        info: a `contract.ServingInfo` (`info.jit_compile`: the model's
            forward pass runs in a `tf.function(jit_compile=True)`).
        labels_path: a local file with the class names, one per line,
            copied into the SavedModel's assets/.

    Example:
        module = ServingModule(model.inference_model, info, "labels.txt")
        tf.saved_model.save(module, "export/1", signatures=module.signatures())
    """

    def __init__(self, inference_model, info, labels_path):
        super().__init__(name="mlcrl_serving")
        self._keras = _Untracked(inference_model)
        self._info = info
        # Only the model's forward pass on float images: XLA cannot compile
        # the string decoding (nor the tf.data step) of serving_default.
        self._forward = (tf.function(self._model_forward, jit_compile=True)
                         if info.jit_compile else self._model_forward)
        self.labels_file = tf.saved_model.Asset(labels_path)
        self.serve_image_bytes = tf.function(
            self._serve_image_bytes,
            input_signature=[tf.TensorSpec([None], tf.string, name=contract.IMAGE_BYTES_KEY)])
        self.serve_tensor = tf.function(
            self._serve_tensor,
            # Any shape: a wrong one is one INVALID_ARGUMENT saying the right one.
            input_signature=[tf.TensorSpec(None, tf.float32, name=contract.IMAGES_KEY)])
        self.metadata = tf.function(self._metadata, input_signature=[])
        self.model_variables = _captured_variables(
            [self.serve_image_bytes, self.serve_tensor])

    def signatures(self):
        """The SignatureDefs to save, by name."""
        return {
            contract.SERVING_DEFAULT: self.serve_image_bytes.get_concrete_function(),
            contract.SERVE_TENSOR: self.serve_tensor.get_concrete_function(),
            contract.METADATA: self.metadata.get_concrete_function(),
        }

    def _model_forward(self, images):
        return tf.cast(self._keras.model(images, training=False), tf.float32)

    def _outputs(self, images):
        logits = self._forward(images)
        probabilities = tf.sigmoid(logits)
        scores, ids = request_checks.top_k_by_logits(logits, probabilities, self._info.top_k)
        return {
            "logits": logits,
            "probabilities": probabilities,
            "predicted": probabilities >= self._info.threshold,
            "top_k_scores": scores,
            "top_k_class_ids": ids,
            "top_k_classes": tf.gather(tf.constant(list(self._info.class_names)), ids),
        }

    def _serve_image_bytes(self, image_bytes):
        info = self._info
        with tf.control_dependencies(
                request_checks.check_batch(image_bytes, contract.IMAGE_BYTES_KEY,
                                           info.max_batch_size)):
            images = request_checks.decode_image_batch(tf.identity(image_bytes), info.image_size,
                                        info.max_image_pixels, info.antialias)
        return self._outputs(images)

    def _serve_tensor(self, images):
        size = self._info.image_size
        with tf.control_dependencies([request_checks.check_image_shape(images, size)]):
            images = tf.ensure_shape(tf.identity(images), [None, size, size, 3])
        checks = request_checks.check_batch(images, contract.IMAGES_KEY,
                                            self._info.max_batch_size)
        with tf.control_dependencies(checks):
            with tf.control_dependencies([request_checks.check_pixels(images)]):
                images = tf.identity(images)
        return self._outputs(images)

    def _metadata(self):
        info = self._info
        return {
            "class_names": tf.constant(list(info.class_names)),
            "threshold": tf.constant(info.threshold, tf.float32),
            "top_k": tf.constant(info.top_k, tf.int32),
            "image_size": tf.constant(info.image_size, tf.int32),
            "backbone": tf.constant(info.backbone),
            "variant": tf.constant(info.variant),
            "max_batch_size": tf.constant(info.max_batch_size, tf.int32),
            "max_image_pixels": tf.constant(info.max_image_pixels, tf.int64),
            "antialias": tf.constant(info.antialias),
            "precision": tf.constant(info.precision),
            "jit_compile": tf.constant(info.jit_compile),
        }


def _captured_variables(functions):
    """The variables the traced functions read, each once, in trace order."""
    seen, variables = set(), []
    for function in functions:
        for variable in function.get_concrete_function().variables:
            if id(variable) not in seen:
                seen.add(id(variable))
                variables.append(variable)
    return variables
