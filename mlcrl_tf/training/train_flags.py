"""The training command's flags, generated from `Config` (the only FLAGS reader)."""

import dataclasses

from absl import flags

from mlcrl_tf.modeling import backbones
from mlcrl_tf.run_dir import config as config_lib


def define_flags(flag_values=flags.FLAGS):
    """Defines one flag per `Config` field (called once by `mlcrl_tf.train`)."""
    for field in dataclasses.fields(config_lib.Config):
        name, default, meta = field.name, field.default, field.metadata
        kwargs = {"flag_values": flag_values}
        if meta["choices"]:
            flags.DEFINE_enum(name, default, list(meta["choices"]), meta["help"], **kwargs)
        elif meta["element"]:
            flags.DEFINE_list(name, [str(v) for v in default], meta["help"], **kwargs)
        elif isinstance(default, bool):
            flags.DEFINE_bool(name, default, meta["help"], **kwargs)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, meta["help"], **kwargs)
        elif isinstance(default, float):
            flags.DEFINE_float(name, default, meta["help"], **kwargs)
        else:
            flags.DEFINE_string(name, default, meta["help"], **kwargs)
    flags.mark_flags_as_required(list(config_lib.REQUIRED_FLAGS), flag_values=flag_values)


def config_from_flags(flag_values=flags.FLAGS):
    """Builds the `Config` from parsed absl flags (the only FLAGS reader)."""
    values = {}
    for field in dataclasses.fields(config_lib.Config):
        value = flag_values[field.name].value
        if field.metadata["element"]:
            value = tuple(field.metadata["element"](v) for v in value)
        values[field.name] = value
    if values["backbone_weights"] in backbones.RANDOM_WEIGHTS:
        values["backbone_weights"] = None
    for name in ("export_dir", "eval_files", "selection_files", "labels_file", "data_dir"):
        if not values[name]:
            values[name] = None
    return config_lib.Config(**values)
