"""The flags every converter shares, and the `convert` options they give.

Their defaults and meaning: docs/data.md, Converters.
"""

from absl import flags

from pipelines.records import image_files


def define_writer_flags(num_shards):
    """Defines the flags every converter shares (only when a converter runs
    as a script): output, shards, workers, overwrite, the image limits and
    --allow_paths_outside_image_dir.

    Args:
        num_shards: the converter's default `--num_shards`.
    """
    flags.DEFINE_string("output_dir", None, "Output folder.", required=True)
    flags.DEFINE_integer("num_shards", num_shards, "Number of shard files.")
    flags.DEFINE_integer("num_workers", None, "Processes reading images.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing split.")
    flags.DEFINE_integer(
        "max_image_pixels", image_files.DEFAULT_MAX_IMAGE_PIXELS,
        "Skip an image with more pixels (width x height, read from its "
        "header before decoding).", lower_bound=1)
    flags.DEFINE_integer(
        "max_image_bytes", image_files.DEFAULT_MAX_IMAGE_BYTES,
        "Skip an image file larger than this many bytes.", lower_bound=1)
    flags.DEFINE_bool(
        "allow_paths_outside_image_dir", False,
        "Accept absolute image names and names resolving (symlinks "
        "followed) outside the image folder.")


def writer_options(flag_values):
    """The keyword arguments of a converter's `convert` from the shared
    flags (see `define_writer_flags`)."""
    return {
        "num_shards": flag_values.num_shards,
        "num_workers": flag_values.num_workers,
        "overwrite": flag_values.overwrite,
        "limits": image_files.ImageLimits(flag_values.max_image_pixels,
                              flag_values.max_image_bytes),
        "allow_paths_outside_image_dir":
            flag_values.allow_paths_outside_image_dir,
    }
