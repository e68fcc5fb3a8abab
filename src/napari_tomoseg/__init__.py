"""napari-tomoseg: train small networks from a few boxes and annotate cryo-ET tomograms.

The core modules (``io``, ``synthetic``, ``boxes``, ``trainset``, ``models``, ``training``,
``model_file`` ...) use only numpy, scipy, mrcfile and torch, so they work from a script,
the ``tomoseg`` command line or a cluster worker.  The napari widgets are thin layers on top.
"""

__version__ = "0.1.0"

from .errors import TomosegError

__all__ = ["TomosegError", "__version__"]
