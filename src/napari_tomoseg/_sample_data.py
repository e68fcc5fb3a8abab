"""npe2 sample data: a simulated cell tomogram with its ground-truth segmentation."""

from __future__ import annotations

from typing import Any

from ._layers import image_layer_kwargs, labels_layer_kwargs, voxel_metadata
from .simulator.synthetic import CLASS_COLORS, CLASS_NAMES, SimulationSettings, simulate_tomogram

#: Size of the sample: large enough for 64 px boxes, quick to simulate on a laptop.
SAMPLE_SETTINGS = SimulationSettings(shape=(96, 256, 256), voxel_size=10.0, seed=0)


def simulated_cell_tomogram() -> list[tuple[Any, dict[str, Any], str]]:
    """The simulated tomogram (Image) and its six-class ground truth (Labels)."""
    sim = simulate_tomogram(SAMPLE_SETTINGS)
    scale = (float(sim.voxel_size),) * 3
    meta = voxel_metadata(scale)
    image_meta = {**meta, "source_path": None, "simulated": True}
    image = (sim.tomogram, image_layer_kwargs("simulated tomogram", scale, image_meta), "image")
    labels = (
        sim.labels,
        labels_layer_kwargs("ground truth", scale, CLASS_NAMES, CLASS_COLORS, meta),
        "labels",
    )
    return [image, labels]
