"""Autosave: a tomogram's unsaved annotations, kept in the cache folder until saved.

While the painting, the boxes or the feature names have changes that are not saved, the
viewer writes them every few minutes (:data:`AUTOSAVE_INTERVAL_S`) and when training starts
with :func:`write_autosave`, into ``<cache>/autosave/<name>-<id>/``: one folder per tomogram,
named after its identity (its file path, or layer name, and its shape;
:func:`autosave_folder`).  The folder is an annotations folder
(:mod:`napari_tomoseg.data.annotations`: painting, boxes and feature names, written all or
nothing), whose ``annotations.json`` also records when and by which process it was written.
When the same tomogram is opened after a crash, :func:`find_autosave` finds it and
:func:`read_autosave` restores it.  Saving the annotations, or discarding them when the
viewer closes, deletes it (:func:`discard_autosave`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TomosegError
from ..folders import cache_dir, cache_name
from .annotations import Annotations, load_annotations, read_annotations_info, save_annotations
from .io import Writer, format_duration, this_writer

#: Seconds between autosaves while the annotations have unsaved changes.
AUTOSAVE_INTERVAL_S = 180.0
#: The entry of ``annotations.json`` that marks an autosave (when, by whom, how many boxes).
AUTOSAVE_KEY = "autosave"


def autosave_root() -> Path:
    """The folder that holds one autosave folder per tomogram."""
    return cache_dir() / "autosave"


def tomogram_identity(source: str, shape: Sequence[int]) -> str:
    """What makes two opened tomograms the same: the file (its absolute path) or the layer
    name, and the shape."""
    path = Path(source)
    where = str(path.resolve()) if path.is_file() else str(source)
    return f"{where}|{'x'.join(str(int(n)) for n in shape)}"


def autosave_folder(source: str, shape: Sequence[int]) -> Path:
    """The autosave folder of one tomogram (``<cache>/autosave/<name>-<CRC of identity>``)."""
    return autosave_root() / cache_name(source, tomogram_identity(source, shape))


@dataclass(frozen=True)
class AutosaveInfo:
    """One autosave: where, of which tomogram, when and by which process it was written."""

    folder: Path
    source: str
    shape: tuple[int, ...]
    saved: _dt.datetime
    writer: Writer | None
    n_positive: int
    n_negative: int

    def describe(self, now: _dt.datetime | None = None) -> str:
        """E.g. "saved 2025-06-01 14:03 (12 min ago): 3 positive, 10 negative boxes"."""
        now = now or _dt.datetime.now(self.saved.tzinfo)
        ago = format_duration((now - self.saved).total_seconds())
        when = self.saved.astimezone().strftime("%Y-%m-%d %H:%M")
        return (
            f"saved {when} ({ago} ago): {self.n_positive} positive, "
            f"{self.n_negative} negative boxes"
        )

    def open_elsewhere(self) -> bool:
        """Whether another process of this host, still running, keeps it up to date (the
        same tomogram open in another viewer): then it is no crash's leftover."""
        return (
            self.writer is not None
            and self.writer.pid != os.getpid()
            and self.writer.running() is True
        )

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())


def write_autosave(annotations: Annotations) -> AutosaveInfo:
    """Write ``annotations`` (of the tomogram ``annotations.source``) into its autosave
    folder, replacing the previous autosave all at once.

    The painting is copied first and the copy written, so edits made meanwhile do not mix
    into the file; a caller that runs this in a worker thread while the user paints
    compares its own count of edits before and after to know whether the autosave is
    still current.
    """
    if not annotations.source:
        raise TomosegError("An autosave needs the tomogram's source (a file path or a name).")
    snapshot = dataclasses.replace(annotations, painting=np.array(annotations.painting))
    folder = autosave_folder(annotations.source, snapshot.painting.shape)
    saved = _dt.datetime.now(_dt.timezone.utc)
    record = {
        "saved": saved.isoformat(),
        "writer": this_writer().token,
        "positives": len(snapshot.positives),
        "negatives": len(snapshot.negatives),
    }
    save_annotations(folder, snapshot, overwrite=True, extra={AUTOSAVE_KEY: record})
    return _info(folder, read_annotations_info(folder))


def _info(folder: Path, info: dict[str, Any]) -> AutosaveInfo:
    record = info.get(AUTOSAVE_KEY)
    if not isinstance(record, dict):
        raise TomosegError(f"{folder} holds annotations, but not an autosave.")
    try:
        saved = _dt.datetime.fromisoformat(str(record["saved"]))
        return AutosaveInfo(
            folder=folder,
            source=str(info.get("source") or ""),
            shape=tuple(int(n) for n in info["shape"]),
            saved=saved if saved.tzinfo else saved.replace(tzinfo=_dt.timezone.utc),
            writer=Writer.parse(str(record.get("writer", ""))),
            n_positive=int(record.get("positives", 0)),
            n_negative=int(record.get("negatives", 0)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise TomosegError(f"The autosave in {folder} is damaged ({exc}).") from None


def find_autosave(source: str, shape: Sequence[int]) -> AutosaveInfo | None:
    """The autosave of this tomogram, if there is a readable one."""
    folder = autosave_folder(source, shape)
    if not folder.is_dir():
        return None
    try:
        return _info(folder, read_annotations_info(folder))
    except TomosegError:
        return None


def read_autosave(info: AutosaveInfo) -> Annotations:
    """The annotations an autosave holds, exactly as they were written."""
    return load_annotations(info.folder, expected_shape=info.shape)


def list_autosaves() -> list[AutosaveInfo]:
    """Every readable autosave in the cache, the newest first."""
    root = autosave_root()
    found = []
    if root.is_dir():
        for folder in root.iterdir():
            try:
                found.append(_info(folder, read_annotations_info(folder)))
            except TomosegError:
                continue
    return sorted(found, key=lambda a: a.saved, reverse=True)


def discard_autosave(folder: str | os.PathLike) -> bool:
    """Delete an autosave folder (the annotations were saved, or thrown away on purpose);
    returns whether there was one.  Only folders inside :func:`autosave_root` are deleted."""
    folder = Path(folder)
    if folder.parent.resolve() != autosave_root().resolve():
        raise TomosegError(f"{folder} is not an autosave folder.")
    if not folder.is_dir():
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True
