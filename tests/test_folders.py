"""The per-user folders: the platform's places (platformdirs), each overridden by its variable."""

import sys
from pathlib import Path

import platformdirs
import pytest

from napari_tomoseg.folders import CACHE_ENV, CONFIG_ENV, cache_dir, cache_name, config_dir


def test_folders_follow_the_platform(monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert cache_dir() == Path(platformdirs.user_cache_dir("napari-tomoseg", appauthor=False))
    assert config_dir() == Path(platformdirs.user_config_dir("napari-tomoseg", appauthor=False))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="XDG folders are Linux's")
def test_the_xdg_variables_move_the_folders_on_linux(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xc"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xf"))
    assert cache_dir() == tmp_path / "xc" / "napari-tomoseg"
    assert config_dir() == tmp_path / "xf" / "napari-tomoseg"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "napari-tomoseg"


def test_the_environment_variables_override_the_folders(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "config"))
    assert cache_dir() == tmp_path / "cache"
    assert config_dir() == tmp_path / "config"


def test_cache_names_are_readable_and_tell_tomograms_apart():
    a, b = cache_name("/data/a/tomo 1.mrc"), cache_name("/data/b/tomo 1.mrc")
    assert a.startswith("tomo_1.mrc-") and b.startswith("tomo_1.mrc-") and a != b
