"""All TensorBoard writing of a training run.

    summaries = TrainingSummaries(model_dir, is_chief)
    summaries.write_train(step, terms, learning_rates, speed)
    summaries.write_eval(step, result, model, class_names, max_images=4)

Under `model_dir/train`: every loss term (`loss/...`), both learning rates,
images/s and steps/s, the float16 loss scale. Under `model_dir/eval`: the 13
metrics (`metrics/...`), per-class AP, the same metrics on
`--selection_files` (`selection_metrics/...`) and a few eval images with
their top predictions and CAM maps (`eval/cams`, panels from
`mlcrl_tf.cams`). Workers other than the chief write nothing.
"""

import os

import numpy as np
import tensorflow as tf

from mlcrl_tf import cams

TAG = "eval/cams"
TILE_SIZE = 128


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
    panels = cams.eval_image_panels(samples, model, class_names, max_images, TILE_SIZE)
    return bool(tf.summary.image(TAG, panels, max_outputs=len(panels)))


class TrainingSummaries:
    """The train and eval summary writers of one run.

    Args:
        model_dir: the run's directory.
        is_chief: only the chief writes; other workers get no-op writers.
    """

    def __init__(self, model_dir, is_chief=True):
        if is_chief:
            self.train_writer = tf.summary.create_file_writer(
                os.path.join(model_dir, "train"))
            self.eval_writer = tf.summary.create_file_writer(os.path.join(model_dir, "eval"))
        else:
            self.train_writer = self.eval_writer = tf.summary.create_noop_writer()

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

    def flush(self):
        self.train_writer.flush()
        self.eval_writer.flush()
