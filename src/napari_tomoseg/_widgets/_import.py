"""Import step: bin and pre-filter a tomogram (EMAN2 import), keeping the voxel size."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    PushButton,
    SpinBox,
)

from .._layers import image_layer_kwargs, layer_voxel_size, voxel_metadata
from ..data.io import MRC_EXTENSIONS
from ..data.preprocess import PreprocessSettings, iter_preprocess
from ..errors import TomosegError
from ._common import (
    RememberedSettings,
    TaskRunner,
    describe_error,
    follow_layers,
    layer_choices,
    layer_volume,
    notify_error,
    notify_info,
)

if TYPE_CHECKING:
    import napari


class ImportWidget(Container):
    """Open a tomogram (or take an open one), bin it and pre-filter it into a new layer."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        self.file = FileEdit(
            label="open file",
            filter="*" + " *".join(MRC_EXTENSIONS),
            tooltip="Open a tomogram (.mrc .rec .map .st .ali .mrcs) at its voxel size.",
        )
        self.open_button = PushButton(text="Open")
        self.source = ComboBox(label="tomogram", choices=layer_choices(viewer, "image"))
        self.shrink = SpinBox(
            label="shrink",
            value=1,
            min=1,
            max=16,
            tooltip="Bin by this factor (4 turns 4k x 4k into 1k x 1k).",
        )
        self.lowpass = FloatSpinBox(
            label="low-pass (A)",
            value=0.0,
            min=0.0,
            max=10000.0,
            tooltip="Remove detail finer than this; 0 = off.",
        )
        self.highpass = FloatSpinBox(
            label="high-pass (A)",
            value=0.0,
            min=0.0,
            max=100000.0,
            tooltip="Remove gradients coarser than this; 0 = off.",
        )
        self.normalise = CheckBox(label="normalise", value=True)
        self.clamp = FloatSpinBox(
            label="clamp (sigma)",
            value=0.0,
            min=0.0,
            max=100.0,
            tooltip="Clip values beyond this many standard deviations; 0 = off.",
        )
        self.run_button = PushButton(text="Import")
        self.status = Label(value="")
        self.extend(
            [
                self.file,
                self.open_button,
                self.source,
                self.shrink,
                self.lowpass,
                self.highpass,
                self.normalise,
                self.clamp,
                self.run_button,
                self.status,
            ]
        )
        self.runner = TaskRunner("Import")
        self.remembered = RememberedSettings(
            "import",
            {
                "shrink": self.shrink,
                "lowpass": self.lowpass,
                "highpass": self.highpass,
                "normalise": self.normalise,
                "clamp": self.clamp,
            },
        )
        self.open_button.changed.connect(self.open_file)
        self.run_button.changed.connect(self.run)
        follow_layers(viewer, self.source)

    def settings(self) -> PreprocessSettings:
        return PreprocessSettings(
            shrink=int(self.shrink.value),
            lowpass_angstrom=self.lowpass.value or None,
            highpass_angstrom=self.highpass.value or None,
            normalise=bool(self.normalise.value),
            clamp_sigma=self.clamp.value or None,
        )

    def open_file(self, *_: Any) -> None:
        path = str(self.file.value)
        layers = self.viewer.open(path, plugin="napari-tomoseg")
        if layers:
            self.source.reset_choices()
            self.source.value = layers[0]

    def run(self, *_: Any) -> Any:
        layer = self.source.value
        if layer is None:
            notify_error("Open a tomogram first (File > Open, or 'open file' above).")
            return None
        settings = self.settings()
        try:
            voxel_size = layer_voxel_size(layer)
        except TomosegError as exc:
            notify_error(describe_error(exc))
            return None
        data = layer_volume(layer)  # a multiscale layer: its finest level
        name = (
            f"{layer.name} (bin {settings.shrink})"
            if settings.shrink > 1
            else (f"{layer.name} (filtered)")
        )
        source_meta = dict(layer.metadata or {})

        def done(result: Any) -> None:
            if result is None:
                return
            volume, new_voxel = result
            scale = new_voxel or tuple(float(s) * settings.shrink for s in layer.scale)
            meta = {
                **source_meta,
                **voxel_metadata(new_voxel),
                "shrink": settings.shrink,
                "preprocess": settings.__dict__.copy(),
            }
            self.viewer.add_image(volume, **image_layer_kwargs(name, scale, meta))
            self.status.value = (
                f"{name}: {volume.shape[0]} x {volume.shape[1]} x {volume.shape[2]}"
            )
            notify_info(f"Imported {name}.")

        return self.runner.start(
            lambda stop: iter_preprocess(data, voxel_size, settings, stop), on_done=done
        )
