"""Image names of an annotation list, resolved to real paths inside the image folder.

`ImagePaths.resolve` is the check every converter applies to an image name
(docs/data.md, Image names).
"""

import os


class ImagePaths:
    """The image names of one annotation list, resolved and checked.

    A name must resolve (symlinks followed) inside `image_dir`, and no two
    names may resolve to one file.

    Args:
        image_dir: the folder the names are relative to.
        allow_outside: accept absolute names and names resolving outside
            `image_dir` (`--allow_paths_outside_image_dir`).

    Example:

    >>> paths = ImagePaths("/no/such/images")
    >>> paths.resolve("cats/1.jpg", "train.csv, line 2")
    '/no/such/images/cats/1.jpg'
    >>> paths.resolve("../1.jpg", "train.csv, line 3")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: train.csv, line 3: ../1.jpg resolves to /no/such/1.jpg, outside image_dir ...
    """

    def __init__(self, image_dir, allow_outside=False):
        self.image_dir = image_dir
        self.root = os.path.realpath(image_dir)
        self.allow_outside = allow_outside
        self._first_entry = {}  # Real path -> the entry that named it.

    def resolve(self, name, entry):
        """Returns the real path of image `name`.

        Args:
            name: the image's name in the annotations.
            entry: how errors name the annotation entry, e.g.
                "train.csv, line 3".

        Raises:
            ValueError: naming `entry`: an empty name, an absolute name or one
                resolving outside the image folder (unless `allow_outside`),
                or a file another entry already named.
        """
        if not isinstance(name, str) or not name.strip() or "\0" in name:
            raise ValueError(f"{entry}: bad image file name {name!r}")
        if os.path.isabs(name) and not self.allow_outside:
            raise ValueError(
                f"{entry}: file name {name} must be relative to image_dir "
                f"{self.image_dir} (or pass --allow_paths_outside_image_dir)")
        real = os.path.realpath(os.path.join(self.image_dir, name))
        if not self.allow_outside and os.path.commonpath(
                [real, self.root]) != self.root:
            raise ValueError(
                f"{entry}: {name} resolves to {real}, outside image_dir "
                f"{self.root} (pass --allow_paths_outside_image_dir to allow "
                "it)")
        if real in self._first_entry:
            raise ValueError(f"{entry}: {name} is the same file ({real}) as "
                             f"{self._first_entry[real]}")
        self._first_entry[real] = entry
        return real
