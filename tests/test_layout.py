"""The package layout: the core grouped by stage, free of Qt and napari, and the module
names of the flat layout of earlier versions still importing the same modules."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import napari_tomoseg
from napari_tomoseg import MOVED_MODULES

PACKAGE = Path(napari_tomoseg.__file__).parent
STAGES = ("data", "learning", "applying", "simulator")
# the napari side: everything else is core
NAPARI_SIDE = ("_widgets", "_reader", "_writer", "_layers", "_sample_data")


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_an_old_module_name_imports_the_module_of_its_new_name(old):
    before = importlib.import_module(f"napari_tomoseg.{old}")
    after = importlib.import_module(f"napari_tomoseg.{MOVED_MODULES[old]}")
    assert before is after
    assert before.__spec__.name == f"napari_tomoseg.{MOVED_MODULES[old]}"
    assert getattr(napari_tomoseg, old) is after


def test_old_names_reach_submodules_and_names_as_before():
    from napari_tomoseg.inference import iter_apply
    from napari_tomoseg.io import read_tomogram
    from napari_tomoseg.models.unet import UNet

    from napari_tomoseg.applying.inference import iter_apply as new_apply
    from napari_tomoseg.data.io import read_tomogram as new_read
    from napari_tomoseg.learning.models.unet import UNet as NewUNet

    assert (iter_apply, read_tomogram, UNet) == (new_apply, new_read, NewUNet)
    assert (
        sys.modules["napari_tomoseg.models.unet"]
        is sys.modules["napari_tomoseg.learning.models.unet"]
    )
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        napari_tomoseg.nothing_here  # noqa: B018


def test_every_core_module_lives_in_a_stage_folder():
    top = sorted(
        p.stem
        for p in PACKAGE.iterdir()
        if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))
        and p.stem != "__init__"
    )
    shared = {"cli", "_cli_copick", "errors", "progress", "colours", "folders", "devices"}
    assert set(top) == set(STAGES) | shared | set(NAPARI_SIDE)


def test_the_core_imports_neither_qt_nor_napari():
    core = [
        f"napari_tomoseg.{'.'.join(p.relative_to(PACKAGE).with_suffix('').parts)}"
        for stage in STAGES
        for p in (PACKAGE / stage).rglob("*.py")
    ]
    core = [m.removesuffix(".__init__") for m in core] + ["napari_tomoseg.cli"]
    code = (
        "import importlib, sys\n"
        f"for name in {core!r}:\n"
        "    importlib.import_module(name)\n"
        "gui = sorted(m for m in sys.modules if m.split('.')[0] in ('napari', 'qtpy', 'PyQt5',"
        " 'PyQt6', 'PySide2', 'PySide6', 'magicgui'))\n"
        "assert not gui, gui\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _imported_stages(path):
    """The stages a core module imports (relative imports, at any depth in a function)."""
    import ast

    tree = ast.parse(path.read_text())
    package = path.relative_to(PACKAGE).parent.parts
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            target = (*base, *(node.module.split(".") if node.module else ()))
            if target and target[0] in STAGES:
                found.add(target[0])
    return found


def test_each_stage_imports_only_the_stages_before_it():
    for rank, stage in enumerate(STAGES):
        for path in (PACKAGE / stage).rglob("*.py"):
            later = _imported_stages(path) & set(STAGES[rank + 1 :])
            assert not later, f"{path.relative_to(PACKAGE)} imports {sorted(later)}"
