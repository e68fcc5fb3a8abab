"""napari-tomoseg: train small networks from a few boxes and annotate cryo-ET tomograms.

The core is grouped by stage: ``data`` (reading and preparing tomograms, boxes and
annotations), ``learning`` (training sets, architectures, training, the network file),
``applying`` (inference, merge, picking, batch runs) and ``simulator``.  It uses numpy,
scipy, mrcfile and torch only, so it works from a script, the ``tomoseg`` command line or a
cluster worker; the napari widgets (``_widgets``) are thin layers on top.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"

from .errors import TomosegError  # noqa: E402  (after __version__, which modules import)

__all__ = ["MOVED_MODULES", "TomosegError", "__version__"]


# -- the module names of earlier versions -----------------------------------------------------
#: Where each module of the flat layout of earlier versions lives now: ``napari_tomoseg.io``
#: is ``napari_tomoseg.data.io``.  The old names import the same module objects.
MOVED_MODULES = {
    "io": "data.io",
    "zarr_io": "data.zarr_io",
    "preprocess": "data.preprocess",
    "boxes": "data.boxes",
    "annotations": "data.annotations",
    "autosave": "data.autosave",
    "copick_io": "applying.copick_io",
    "probability": "data.probability",
    "trainset": "learning.trainset",
    "augment": "learning.augment",
    "models": "learning.models",
    "training": "learning.training",
    "checkpoint": "learning.checkpoint",
    "model_file": "learning.model_file",
    "pretrained": "learning.pretrained",
    "inference": "applying.inference",
    "merge": "applying.merge",
    "picking": "applying.picking",
    "suggest": "applying.suggest",
    "render": "applying.render",
    "cluster": "applying.cluster",
    "synthetic": "simulator.synthetic",
    "demo": "simulator.demo",
}


def _current_name(name: str) -> str | None:
    """The module's name today for an old ``napari_tomoseg.<old>[.<sub>]`` name, else None."""
    head, _, rest = name.removeprefix(f"{__name__}.").partition(".")
    if not name.startswith(f"{__name__}.") or head not in MOVED_MODULES:
        return None
    return ".".join(filter(None, (__name__, MOVED_MODULES[head], rest)))


class _OldNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module name as the module of its new name (one object, both names)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        current = _current_name(name)
        return None if current is None else importlib.util.spec_from_loader(name, self)

    def create_module(self, spec: Any) -> Any:
        module = importlib.import_module(_current_name(spec.name) or spec.name)
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module: Any) -> None:
        # the import system gave the module the old name's spec; it keeps its own
        module.__spec__ = module.__spec__.loader_state


def __getattr__(name: str) -> Any:
    if name in MOVED_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# first in line: a moved package's submodules must not also load under their old names
if not any(type(f).__qualname__ == "_OldNames" for f in sys.meta_path):
    sys.meta_path.insert(0, _OldNames())
