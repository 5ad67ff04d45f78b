"""Counting the records an input pipeline skipped as undecodable: `SkipCounter`.

When the counts are exact (evaluation: per file and at the end of the pass;
training: per pass): docs/data.md, Input pipeline (Skip counts).
"""

from absl import logging
import tensorflow as tf


class SkipCounter:
    """Where `make_dataset` reports its counts: records read, images
    delivered, records skipped as undecodable.

    Host int64 variables the pipeline writes as it runs. Use one counter per
    `make_dataset` call, created outside any `tf.distribute` strategy scope
    (docs/data.md, Skip counts). Takes no arguments.

    Raises:
        ValueError: created inside a `tf.distribute` strategy scope.

    Example:

    >>> counter = SkipCounter()
    >>> counter.read, counter.delivered, counter.skipped
    (0, 0, 0)

    With shards on disk:

        counter = SkipCounter()
        ds = make_dataset("data/demo/tfrecords/test-*.tfrecord", batch_size=64,
                          image_size=96, num_classes=10, training=False,
                          skip_counter=counter)
        for batch in ds:
            ...
        counter.log("eval")  # a warning if any record was skipped
    """

    def __init__(self):
        if tf.distribute.has_strategy():
            raise ValueError(
                "SkipCounter: create it outside the tf.distribute strategy "
                "scope (it holds plain host variables).")
        with tf.init_scope(), tf.device("/cpu:0"):
            self._values = {name: tf.Variable(0, dtype=tf.int64, trainable=False,
                                              name=f"records_{name}")
                            for name in ("read", "delivered", "skipped")}
        self._attached = False

    @property
    def read(self):
        """Records read from completed files (int); this input pipeline's
        share of them when pipelines share files."""
        return int(self._values["read"].numpy())

    @property
    def delivered(self):
        """Images decoded and passed on (int)."""
        return int(self._values["delivered"].numpy())

    @property
    def skipped(self):
        """Records that could not be decoded so far (int)."""
        return int(self._values["skipped"].numpy())

    def reset(self):
        """Sets every count to 0 (between passes, not during one)."""
        for v in self._values.values():
            v.assign(0)

    def log(self, name="input"):
        """Logs the counts: a warning if any record was skipped."""
        skipped = self.skipped
        log = logging.warning if skipped else logging.info
        log("%s pipeline: %d records read, %d images delivered, %d skipped "
            "as undecodable.", name, self.read, self.delivered, skipped)

    def attach(self):
        """Claims the counter for one dataset (ValueError if already claimed)."""
        if self._attached:
            raise ValueError("This SkipCounter already belongs to another "
                             "make_dataset call; create one per dataset.")
        self._attached = True

    def record(self, element):
        """Stores the running counts carried by one element (inside tf.data)."""
        updates = [self._values[name].assign(element[name], read_value=False)
                   for name in ("read", "delivered", "skipped")]
        with tf.control_dependencies(updates):
            return tf.nest.map_structure(tf.identity, element)
