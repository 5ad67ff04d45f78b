"""The `tf.distribute` strategies of `--strategy`, and who is the chief.

- `default`: one device (`tf.distribute.get_strategy()`).
- `mirrored`: every local GPU (`MirroredStrategy`); without GPUs, the CPU's
  logical devices (`--num_cpu_devices`), reduced on the host because NCCL
  needs GPUs.
- `multi_worker`: `MultiWorkerMirroredStrategy` from `TF_CONFIG`. Keras
  `fit()` does not work under it (tensorflow/tensorflow#72388); the CLI
  training loop does.
"""

import os

import tensorflow as tf


def split_cpu(num_devices):
    """Makes `num_devices` logical CPU devices (before TF initialises)."""
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_devices)


def make_strategy(name, num_cpu_devices=0):
    """The tf.distribute strategy named by --strategy.

    Args:
        name: "default", "mirrored" or "multi_worker".
        num_cpu_devices: split the CPU into this many logical devices first
            (multi-replica tests without GPUs); 0 or 1 = do not.

    Raises:
        ValueError: multi_worker without TF_CONFIG.
    """
    if num_cpu_devices > 1:
        split_cpu(num_cpu_devices)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if tf.config.list_physical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        # NCCL needs GPUs: reduce on the host instead.
        return tf.distribute.MirroredStrategy(
            devices=devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
    if "TF_CONFIG" not in os.environ:
        raise ValueError("--strategy=multi_worker needs the TF_CONFIG environment "
                         "variable describing the cluster (see README).")
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_chief(strategy):
    """True on the worker that writes checkpoints, summaries and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    cluster = resolver.cluster_spec().as_dict()
    if "chief" in cluster:
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0


def worker_name(strategy):
    """`<task_type>_<task_id>` of this worker ("chief" on one machine)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return "chief"
    return f"{resolver.task_type}_{resolver.task_id}"


def num_workers(strategy):
    """Workers (input pipelines) of the strategy: 1 unless multi-worker."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return 1
    spec = resolver.cluster_spec()
    return sum(spec.num_tasks(job) for job in ("chief", "worker") if job in spec.jobs)
