"""The `tf.distribute` strategies of `--strategy`, and who is the chief.

`fit()` fails under MultiWorkerMirroredStrategy (tensorflow/tensorflow#72388);
the CLI loop runs under every strategy (docs/design.md, Training).
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


def describe(strategy):
    """One line: how many replicas (and workers) the strategy trains on, and
    where; e.g. "Training on 2 replicas: MirroredStrategy over CPU:0, CPU:1."."""
    replicas = strategy.num_replicas_in_sync
    try:
        devices = strategy.extended.worker_devices
    except RuntimeError:  # the default strategy: one device, TensorFlow's choice
        devices = ()
    names = ", ".join(d.split("device:")[-1] for d in devices)
    workers = num_workers(strategy)
    where = f" on {workers} workers" if workers > 1 else ""
    name = type(strategy).__name__
    if name.startswith("_Default"):
        name = "one device, no tf.distribute strategy"
    return (f"Training on {replicas} replica{'s' if replicas != 1 else ''}{where}: "
            f"{name}" + (f" over {names}" if names else "") + ".")
