"""The module paths of release 0.1, kept importable after the layout moved them.

`install({"mlcrl_tf.model": "mlcrl_tf.modeling.model", ...})` makes
`import mlcrl_tf.model` give the module that now lives at the new path, when it
is first imported (nothing is imported up front). Keras reads these paths in
`.keras` files saved by 0.1 (`"module": "mlcrl_tf.model"`), and 0.1's users
wrote them in their scripts (docs/data.md, Layout).
"""

import importlib
import importlib.abc
import importlib.util
import sys


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module path and loads the new module under it."""

    def __init__(self, aliases):
        self.aliases = dict(aliases)

    def find_spec(self, fullname, path=None, target=None):
        del path, target
        if fullname not in self.aliases:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(self.aliases[spec.name])

    def exec_module(self, module):
        del module  # Already executed under its own name.


def install(aliases):
    """Makes each old dotted path in `aliases` import its new module."""
    sys.meta_path.append(_AliasFinder(aliases))
