"""napari widgets: thin front ends that gather layer data, call the core in a worker thread
and write the results back as layers. One module per widget."""

from ._apply import ApplyWidget
from ._boxes import BoxWidget
from ._copick import CopickWidget
from ._import import ImportWidget
from ._merge import MergeWidget
from ._pick import PickWidget
from ._train import TrainWidget

__all__ = [
    "ApplyWidget",
    "BoxWidget",
    "CopickWidget",
    "ImportWidget",
    "MergeWidget",
    "PickWidget",
    "TrainWidget",
]
