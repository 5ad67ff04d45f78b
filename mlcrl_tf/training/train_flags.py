"""The training command's flags, generated from `Config` (the only FLAGS reader)."""

import dataclasses

from absl import flags

from mlcrl_tf.modeling import backbones
from mlcrl_tf.run_dir import config as config_lib


class _ListOf(flags.ListParser):
    """A comma-separated list of ints or floats: a bad element is absl's
    one-line flag error, as for every other flag."""

    def __init__(self, element):
        super().__init__()
        self.element = element

    def parse(self, argument):
        values = super().parse(argument)
        try:
            return [self.element(value) for value in values]
        except ValueError:
            raise ValueError(f"expected a comma-separated list of "
                             f"{self.element.__name__}s, got {argument!r}") from None

    def flag_type(self):
        return f"comma separated list of {self.element.__name__}s"


def define_flags(flag_values=flags.FLAGS):
    """Defines one flag per `Config` field (called once by `mlcrl_tf.train`)."""
    for field in dataclasses.fields(config_lib.Config):
        name, default, meta = field.name, field.default, field.metadata
        kwargs = {"flag_values": flag_values}
        if meta["choices"]:
            flags.DEFINE_enum(name, default, list(meta["choices"]), meta["help"], **kwargs)
        elif meta["element"]:
            flags.DEFINE(_ListOf(meta["element"]), name, list(default), meta["help"],
                         serializer=flags.CsvListSerializer(","), **kwargs)
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
            value = tuple(value)
        values[field.name] = value
    if values["backbone_weights"] in backbones.RANDOM_WEIGHTS:
        values["backbone_weights"] = None
    for name in ("export_dir", "eval_files", "selection_files", "labels_file", "data_dir"):
        if not values[name]:
            values[name] = None
    return config_lib.Config(**values)
