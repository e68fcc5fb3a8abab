"""Apply: run a network over a whole tomogram layer in a worker, with progress and cancel.

The probability map arrives as an Image layer and the mask as a Labels layer, both on the
tomogram's grid with the feature name(s) in their metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    PushButton,
)

from .._layers import labels_layer_kwargs, layer_voxel_size, voxel_metadata
from ..applying.inference import DEFAULT_THRESHOLD, ApplySettings, iter_apply
from ..data.probability import scale_of
from ..errors import TomosegError
from ..learning.model_file import load_network
from ..learning.pretrained import available as shipped_networks
from ..learning.pretrained import load_pretrained
from ._common import (
    RememberedSettings,
    TaskRunner,
    describe_error,
    follow,
    follow_layers,
    grid_kwargs,
    layer_choices,
    layer_volume,
    notify_error,
    notify_info,
    session,
)

if TYPE_CHECKING:
    import napari

SOURCES = ("network just trained", "network file", "shipped network")


def hex_colors(class_colors: Any) -> dict[int, str]:
    """Class colours (RGBA floats or hex strings) as {value: hex}."""
    colors: dict[int, str] = {}
    for i, color in enumerate(class_colors or ()):
        if isinstance(color, str):
            colors[i] = color
        else:
            rgba = [int(round(float(c) * 255)) for c in (list(color) + [1.0])[:4]]
            colors[i] = "#" + "".join(f"{c:02x}" for c in rgba)
    colors[0] = "#00000000"
    return colors


#: The widget's slice-plane choices and the ``ApplySettings.planes`` of each.
PLANE_CHOICES = {"network's own": None, "XY": 1, "XY + XZ + YZ": 3}


class ApplyWidget(Container):
    """Segment a whole tomogram with a trained network."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        self.source = ComboBox(label="network", choices=list(SOURCES), value=SOURCES[0])
        self.network_file = FileEdit(label="network file", mode="r", filter="*.tsnet")
        self.shipped = ComboBox(
            label="shipped network",
            choices=list(shipped_networks()),
            tooltip="networks trained on simulated tomograms that come with napari-tomoseg: "
            "they segment without any boxes",
        )
        self.tomogram = ComboBox(label="tomogram", choices=layer_choices(viewer, "image"))
        self.own_threshold = CheckBox(
            label="network's threshold",
            value=True,
            tooltip="the threshold the network records for the slice planes it is applied in "
            "(for XY, chosen on its held-out boxes when it was trained)",
        )
        self.threshold = FloatSpinBox(
            label="threshold", value=DEFAULT_THRESHOLD, min=0.0, max=1.0, step=0.05
        )
        self.threshold.enabled = False
        self.own_threshold.changed.connect(lambda own: setattr(self.threshold, "enabled", not own))
        self.tta = CheckBox(label="test-time augmentation", value=ApplySettings.tta)
        self.planes = ComboBox(
            label="slice planes",
            choices=list(PLANE_CHOICES),
            value=next(iter(PLANE_CHOICES)),
            tooltip="XY + XZ + YZ also finds membranes lying face-on to the beam (3x the "
            "time); the network's own choice is XY + XZ + YZ for the shipped membrane networks",
        )
        self.run_button = PushButton(text="Apply")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        self.extend(
            [
                self.source,
                self.network_file,
                self.shipped,
                self.tomogram,
                self.own_threshold,
                self.threshold,
                self.tta,
                self.planes,
                self.run_button,
                self.cancel_button,
                self.status,
            ]
        )
        self.remembered = RememberedSettings(
            "apply",
            {
                "threshold": self.threshold,
                "own_threshold": self.own_threshold,
                "tta": self.tta,
                "planes": self.planes,
                "network_file": self.network_file,
            },
        )
        self.runner = TaskRunner("Apply")
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.runner.stop)
        follow_layers(viewer, self.tomogram)
        follow(session().network_changed, self, self._network_trained)
        self.layers_added: list[Any] = []

    def _network_trained(self, network: Any, source: str) -> None:
        """Say that a network of this session is ready, if that is the chosen source."""
        if self.source.value == SOURCES[0]:
            names = ", ".join(network.meta.class_names[1:])
            self.status.value = f"Ready: the network {source} ({names})."

    def network(self) -> Any:
        if self.source.value == SOURCES[0]:
            if session().network is None:
                raise TomosegError(
                    "No network has been trained in this session: train one, "
                    "or choose 'network file'."
                )
            return session().network
        if self.source.value == SOURCES[2]:
            if not self.shipped.value:
                raise TomosegError("This installation has no shipped networks.")
            return load_pretrained(str(self.shipped.value))
        path = Path(str(self.network_file.value))
        if not path.is_file():
            raise TomosegError(f"Choose a network file (.tsnet); {path} is not a file.")
        return load_network(path)

    def run(self, *_: Any) -> Any:
        try:
            network = self.network()
            tomo = self.tomogram.value
            if tomo is None:
                raise TomosegError("Choose the tomogram to segment.")
            volume = layer_volume(tomo)
            if volume.ndim != 3:
                raise TomosegError(f"'{tomo.name}' is not a 3D tomogram.")
            voxel_size = layer_voxel_size(tomo)
        except TomosegError as exc:
            notify_error(describe_error(exc))
            return None
        threshold = None if self.own_threshold.value else float(self.threshold.value)
        settings = ApplySettings(
            threshold=threshold, tta=bool(self.tta.value), planes=PLANE_CHOICES[self.planes.value]
        )
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.status.value = "applying..."

        def done(result: Any) -> None:
            if result is None or getattr(result, "stopped", False):
                self.status.value = "cancelled: nothing was added"
                return
            self.layers_added = self.add_result_layers(tomo, network, result)
            self.status.value = (
                f"done in {result.seconds:.1f} s (threshold {result.threshold:.2f})"
            )
            notify_info(f"Segmented '{tomo.name}' with the {network.meta.architecture} network.")

        def finished() -> None:
            self.run_button.enabled = True
            self.cancel_button.enabled = False

        return self.runner.start(
            lambda stop: iter_apply(
                network, volume, voxel_size=voxel_size, settings=settings, should_stop=stop
            ),
            on_done=done,
            on_finish=finished,
        )

    def add_result_layers(self, tomo: Any, network: Any, result: Any) -> list[Any]:
        """Probability map(s) as Image layers, the mask as a Labels layer, on the grid."""
        names = list(result.class_names)
        probs = result.probabilities
        if getattr(probs, "ndim", 0) == 3:
            probs = [probs]
        meta_common = {
            **voxel_metadata(result.voxel_size),
            "source_layer": tomo.name,
            "threshold": result.threshold,
        }
        added = []
        for k, prob in enumerate(probs):
            feature = names[k + 1] if k + 1 < len(names) else f"feature {k + 1}"
            layer = self.viewer.add_image(
                prob,
                name=f"{feature} probability ({tomo.name})",
                colormap="magma",
                blending="additive",
                opacity=0.6,
                metadata={
                    **meta_common,
                    "tomoseg_probability": True,
                    "feature": feature,
                    "scale_max": scale_of(prob.dtype),
                },
                contrast_limits=(0.0, scale_of(prob.dtype)),
                **grid_kwargs(tomo),
            )
            added.append(layer)
        kwargs = labels_layer_kwargs(
            f"{'+'.join(names[1:])} mask ({tomo.name})",
            tomo.scale,
            names,
            hex_colors(network.meta.class_colors),
            meta_common,
        )
        kwargs.update(grid_kwargs(tomo))
        added.append(self.viewer.add_labels(np.asarray(result.mask), **kwargs))
        return added
