"""Apply a trained network to whole tomograms: tiled, streaming, seam-free.

The networks are 2D (or 2.5D: ``2 * context_slices + 1`` adjacent Z slices as channels).
A tomogram is read a few slices at a time; each slice is cut into overlapping tiles, batched
for the device, and the tiles' probabilities are blended back so that the result equals
whole-slice inference.  Memory does not grow with the number of slices.  The parts:

- :mod:`.settings`: :class:`ApplySettings`, :class:`ApplyOutputs`, :class:`ApplyResult`
- :mod:`.device`: :func:`resolve_device`, surviving out-of-memory errors
- :mod:`.tiling`: receptive field, tile plans and blending, test-time augmentation
- :mod:`.kernels`: the network made fast to apply (:func:`prepare_for_inference`)
- :mod:`.predict`: tiled prediction of planes on the device (:func:`predict_slices`)
- :mod:`.source`: the tomogram's slices read, checked, rescaled and normalised
- :mod:`.apply`: :func:`iter_apply`, :func:`apply_network`, :func:`apply_binned`
- :mod:`.files`: :func:`iter_apply_file`, :func:`apply_file` (MRC files out)

Measurements of speed and memory are in ``docs/benchmarks.md``.
"""

from ...data.probability import (
    PROBABILITY_DTYPE,
    PROBABILITY_SCALE,
    probabilities_as_float,
    quantize_probabilities,
)
from ...data.voxels import VoxelSize
from .apply import apply_binned, apply_network, iter_apply
from .device import DeviceMemoryError, MemoryBudget, is_out_of_memory, resolve_device
from .files import apply_file, iter_apply_file, probability_paths
from .kernels import FFTConv2d, prepare_for_inference
from .predict import predict_slices
from .settings import (
    DEFAULT_THRESHOLD,
    NONFINITE_POLICIES,
    TTA_TRANSFORMS,
    VOXEL_SIZE_POLICIES,
    ApplyOutputs,
    ApplyResult,
    ApplySettings,
    network_planes,
    network_threshold,
)
from .tiling import AUTO_BLEND, ReceptiveField, TilePlan, auto_overlap, plan_tiles, receptive_field

__all__ = [
    "AUTO_BLEND",
    "DEFAULT_THRESHOLD",
    "NONFINITE_POLICIES",
    "PROBABILITY_DTYPE",
    "PROBABILITY_SCALE",
    "TTA_TRANSFORMS",
    "VOXEL_SIZE_POLICIES",
    "ApplyOutputs",
    "ApplyResult",
    "ApplySettings",
    "DeviceMemoryError",
    "FFTConv2d",
    "MemoryBudget",
    "ReceptiveField",
    "TilePlan",
    "VoxelSize",
    "apply_binned",
    "apply_file",
    "apply_network",
    "auto_overlap",
    "is_out_of_memory",
    "iter_apply",
    "iter_apply_file",
    "network_planes",
    "network_threshold",
    "plan_tiles",
    "predict_slices",
    "prepare_for_inference",
    "probabilities_as_float",
    "probability_paths",
    "quantize_probabilities",
    "receptive_field",
    "resolve_device",
]
