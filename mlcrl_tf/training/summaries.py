"""All TensorBoard writing of a training run: losses, learning rates and
speed under `model_dir/train`; metrics, CAM panels and the label embeddings
(Projector) under `model_dir/eval` (README, TensorBoard).
"""

import os

from absl import logging
import numpy as np
from tensorboard.plugins import projector
import tensorflow as tf

from mlcrl_tf.evaluation import cam_panels
from mlcrl_tf.evaluation import label_space
from pipelines.tfdata import label_stats
from pipelines.utils import files

TAG = "eval/cams"
TILE_SIZE = 128
EMBEDDINGS_NAME = "label_embeddings"
METADATA_FILE = "label_embeddings.tsv"
# The key of the variable `label_embeddings` in a TF2 object-based checkpoint.
TENSOR_NAME = "label_embeddings/.ATTRIBUTES/VARIABLE_VALUE"
IMAGE_TAG = "label_embeddings/closeness_vs_cooccurrence"
SPEARMAN_TAG = "label_embeddings/spearman_vs_pmi"


def write_eval_images(samples, model, class_names, max_images=4):
    """Writes the eval panels to the default summary writer at its step.

    Args:
        samples: a few eval images (see `cams.eval_image_panels`).
        model: the `MLCRLModel` (for the class maps).
        class_names: the C class names.
        max_images: at most this many panels.

    Returns:
        True if a summary was written (False without samples).
    """
    if not samples or len(samples["images"]) == 0 or max_images < 1:
        return False
    panels = cam_panels.eval_image_panels(samples, model, class_names, max_images, TILE_SIZE)
    return bool(tf.summary.image(TAG, panels, max_outputs=len(panels)))


def _tsv_field(text):
    return " ".join(str(text).split())  # No tab or line break inside a field.


class ProjectorFiles:
    """The label embeddings as TensorBoard Projector files in one directory:
    a checkpoint of one (C, D) variable (the latest only), a metadata TSV and
    `projector_config.pbtxt`.

    Args:
        directory: a TensorBoard run directory (e.g. `model_dir/eval`).

    Example:
    >>> import tempfile
    >>> files = ProjectorFiles(tempfile.mkdtemp())
    >>> os.path.basename(files.write(5, np.eye(3), ["cat", "dog", "bird"]))
    'label_embeddings-5'
    """

    def __init__(self, directory):
        self.directory = directory
        self._variable = self._manager = None

    def write(self, step, embeddings, class_names, class_counts=None):
        """Writes the (C, D) embeddings of `step`; returns the checkpoint path.

        Args:
            step: the training step (the checkpoint's number).
            embeddings: (C, D) array.
            class_names: the C names (the projector's labels).
            class_counts: optional (C,) training images per class (a column
                of the metadata, to colour points by frequency).
        """
        embeddings = np.asarray(embeddings, np.float32)
        if self._variable is None:
            tf.io.gfile.makedirs(self.directory)
            self._write_metadata(class_names, class_counts)
            self._variable = tf.Variable(embeddings, trainable=False, name=EMBEDDINGS_NAME)
            self._manager = tf.train.CheckpointManager(
                tf.train.Checkpoint(**{EMBEDDINGS_NAME: self._variable}), self.directory,
                max_to_keep=1, checkpoint_name=EMBEDDINGS_NAME)
        else:
            self._variable.assign(embeddings)
        return self._manager.save(checkpoint_number=int(step))

    def _write_metadata(self, class_names, class_counts):
        rows = ["class\tid\ttrain_images"]
        for i, name in enumerate(class_names):
            count = "" if class_counts is None else str(int(class_counts[i]))
            rows.append(f"{_tsv_field(name)}\t{i}\t{count}")
        files.write_atomically(os.path.join(self.directory, METADATA_FILE),
                               "\n".join(rows) + "\n")
        config = projector.ProjectorConfig()
        embedding = config.embeddings.add()
        embedding.tensor_name = TENSOR_NAME
        embedding.metadata_path = METADATA_FILE  # Relative to the config file.
        projector.visualize_embeddings(self.directory, config)


def write_label_space(embeddings, counts, class_names, max_images=1):
    """The closeness-vs-PMI image and Spearman's rho, to the default writer.

    Args:
        embeddings: (C, D) label embeddings.
        counts: the training labels' `label_stats.LabelCounts`.
        class_names: the C names.
        max_images: 0 writes the scalar only.

    Returns:
        Spearman's rho (NaN when undefined, then not written).
    """
    pmi = label_stats.pmi(counts)
    rho, pairs = label_space.cooccurrence_correlation(embeddings, pmi)
    if np.isfinite(rho):
        tf.summary.scalar(SPEARMAN_TAG, rho)
        caption = f"Spearman(-distance, PMI) = {rho:.3f} over {pairs} pairs"
    else:
        caption = f"Spearman undefined (collapsed embeddings or constant PMI), {pairs} pairs"
    if max_images:
        image = label_space.comparison_image(embeddings, pmi, class_names, caption)
        tf.summary.image(IMAGE_TAG, image[None], max_outputs=1)
    return rho


class TrainingSummaries:
    """The train and eval summary writers of one run.

    The writers open on first use; `close()` flushes and closes them (the
    trainer calls it when training ends, also on an error). Writing after
    `close()` opens new writers (new event files).

    Args:
        model_dir: the run's directory.
        is_chief: only the chief writes; other workers get no-op writers.

    Example:
        summaries = TrainingSummaries("runs/demo")
        summaries.write_train(step, terms, (0.01, 0.001), speed)
        summaries.write_eval(step, result, model, class_names)
        summaries.close()
    """

    def __init__(self, model_dir, is_chief=True):
        self.model_dir = model_dir
        self.is_chief = is_chief
        self.projector = ProjectorFiles(os.path.join(model_dir, "eval"))
        self._label_counts = {}  # (source, data_dir) -> LabelCounts or None
        self._writers = {}  # "train"/"eval" -> open tf.summary writer

    @property
    def train_writer(self):
        """The writer of `model_dir/train`."""
        return self._writer("train")

    @property
    def eval_writer(self):
        """The writer of `model_dir/eval`."""
        return self._writer("eval")

    def _writer(self, name):
        if name not in self._writers:
            self._writers[name] = (
                tf.summary.create_file_writer(os.path.join(self.model_dir, name))
                if self.is_chief else tf.summary.create_noop_writer())
        return self._writers[name]

    def write_train(self, step, terms, learning_rates, speed, loss_scale=None):
        """Loss terms, (head, backbone) learning rates, throughput, loss scale."""
        with self.train_writer.as_default(step=step):
            for name, value in terms.items():
                tf.summary.scalar(f"loss/{name}", value)
            tf.summary.scalar("learning_rate/head", learning_rates[0])
            tf.summary.scalar("learning_rate/backbone", learning_rates[1])
            tf.summary.scalar("throughput/images_per_sec", speed["images_per_sec"])
            tf.summary.scalar("throughput/steps_per_sec", speed["steps_per_sec"])
            if loss_scale is not None:
                tf.summary.scalar("loss_scale", loss_scale)

    def write_eval(self, step, result, model, class_names, max_images=4,
                   prefix="metrics"):
        """Metrics of an `EvalResult`; with prefix "metrics" also AP and images."""
        with self.eval_writer.as_default(step=step):
            for name, value in result.metrics.items():
                tf.summary.scalar(f"{prefix}/{name}", value)
            if prefix != "metrics":
                return
            for name, ap in zip(class_names, result.per_class_ap):
                if np.isfinite(ap):
                    tf.summary.scalar(f"per_class_ap/{name}", ap)
            if result.samples is not None:
                write_eval_images(result.samples, model, class_names, max_images)

    def write_label_embeddings(self, step, model, class_names, train_source, data_dir=None):
        """Label embeddings for the projector, and closeness vs co-occurrence.

        Does nothing on workers other than the chief and for variants
        without a label projector. The training labels are counted on the
        first call (one pass over their label ids); if that fails, a
        warning says why and only the projector files are written.

        Args:
            step: the training step.
            model: an `MLCRLModel`.
            class_names: the C names.
            train_source: the training shards' glob (or `tfds:` split).
            data_dir: TFDS data directory.

        Returns:
            True if something was written.
        """
        if not self.is_chief or model.label_projector is None:
            return False
        embeddings = np.asarray(model.label_embeddings(), np.float32)
        counts = self.train_label_counts(train_source, model.num_classes, data_dir)
        self.projector.write(step, embeddings, class_names,
                             None if counts is None else counts.classes)
        if counts is not None:
            with self.eval_writer.as_default(step=step):
                write_label_space(embeddings, counts, class_names)
        return True

    def train_label_counts(self, source, num_classes, data_dir=None):
        """`label_stats.count_labels` of the training source, once; None if unreadable."""
        key = (source, data_dir)
        if key not in self._label_counts:
            try:
                self._label_counts[key] = label_stats.count_labels(
                    source, num_classes, data_dir)
            except (ValueError, ImportError) as e:
                logging.warning("No label co-occurrence in TensorBoard: %s", e)
                self._label_counts[key] = None
        return self._label_counts[key]

    def flush(self):
        """Writes what the open writers buffered to their event files."""
        for writer in self._writers.values():
            writer.flush()

    def close(self):
        """Flushes and closes the writers (a no-op when none is open).

        Never raises: it runs while training ends, maybe on an error (a full
        disk) that must stay the one reported; what could not be written is
        logged.
        """
        writers, self._writers = self._writers, {}
        for name, writer in writers.items():
            try:
                writer.close()
            except files.IO_ERRORS as e:
                logging.warning("Could not write the %s summaries of %s: %s", name,
                                self.model_dir, files.error_text(e))
