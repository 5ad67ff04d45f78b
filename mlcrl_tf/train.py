"""Trains (or resumes) a model: the command users live in.

    python -m mlcrl_tf.train --flagfile=coco.flags --model_dir=runs/coco_crl

The flags are `Config`'s fields (`mlcrl_tf.run_dir.config`); `--flagfile=NAME`
also finds the shipped flagfiles by name (`mlcrl_tf.training.flagfiles`).
Rerunning the same command resumes from the latest checkpoint in
--model_dir. The work is `mlcrl_tf.training.train_lib`.
"""

import functools
import sys

from absl import app
from absl import logging

from mlcrl_tf.run_dir import checkpoints
from mlcrl_tf.training import flagfiles
from mlcrl_tf.training import stop_signals
from mlcrl_tf.training import train_flags
from mlcrl_tf.training import train_lib
from mlcrl_tf.training import trainer as trainer_lib
from pipelines.utils import console


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = train_flags.config_from_flags()
    try:
        result = train_lib.train_and_evaluate(config)
    except (ValueError, trainer_lib.NonFiniteLossError, checkpoints.CheckpointError) as e:
        sys.exit(f"error: {e}")
    except stop_signals.StopRequested as e:  # exit as a process killed by the signal
        print(e, file=sys.stderr)
        sys.exit(128 + e.signal_number)
    logging.info("Done: %s", result)
    print(f"Finished at step {result['step']}; weights fingerprint {result['fingerprint']}")
    if result["metrics"]:
        print("Final eval: " + " ".join(
            f"{k} {100 * v:.1f}" for k, v in result["metrics"].items()))
    if result["export_path"]:
        print(f"Exported the inference model to {result['export_path']}")


if __name__ == "__main__":
    train_flags.define_flags()
    # --verbosity defaults to WARNING (absl's app.run would raise it to INFO).
    app.run(main, flags_parser=functools.partial(
        console.parse_flags, parser=flagfiles.parse_flags_with_usage))
