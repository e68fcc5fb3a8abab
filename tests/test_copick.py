"""copick projects: what napari-tomoseg writes is what copick reads, and back."""

from __future__ import annotations

import numpy as np
import pytest

from napari_tomoseg.applying.picking import PickSettings, mesh_area, mesh_volume, pick
from napari_tomoseg.errors import OutputExistsError, TomosegError

copick = pytest.importorskip("copick")

from napari_tomoseg.applying import copick_io  # noqa: E402
from napari_tomoseg.applying.copick_io import (  # noqa: E402
    export_meshes,
    export_picks,
    export_segmentation,
    export_tomogram,
    object_name,
    read_copick_segmentation,
    read_copick_tomogram,
)

VS = 8.0


def ball(shape, centre, radius):
    zz, yy, xx = np.indices(shape)
    return (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius**2


@pytest.fixture
def labels():
    """A tiny merged mask: 1 = membrane (a slab), 2 = ribosome (two balls)."""
    mask = np.zeros((16, 24, 32), np.uint8)
    mask[3:5, 2:22, 2:30] = 1
    mask[ball(mask.shape, (10, 8, 9), 3)] = 2
    mask[ball(mask.shape, (10, 15, 24), 3)] = 2
    return mask


def test_object_names_are_what_copick_accepts():
    assert object_name("single_membrane") == "single-membrane"
    assert object_name("Big Vesicle") == "big-vesicle"
    assert object_name("feature 3") == "feature-3"
    from copick.util.escape import sanitize_name

    for name in ("single-membrane", "big-vesicle", "feature-3"):
        assert sanitize_name(name) == name
    with pytest.raises(TomosegError, match="letter or digit"):
        object_name("__")


def test_picks_segmentation_and_meshes_read_back_by_copick(tmp_path, labels):
    config = tmp_path / "project" / "copick.json"
    names = ["background", "single_membrane", "ribosome"]
    result = pick(
        labels, voxel_size=VS, class_names=names, settings=PickSettings(min_size=20, classes=[2])
    )
    assert export_picks(config, "TS_01", result) == {"ribosome": 2}
    assert export_segmentation(config, "TS_01", labels, VS, names) == "tomoseg"
    export_segmentation(config, "TS_01", (labels == 1).astype(np.uint8), VS, names)
    faces = export_meshes(config, "TS_01", labels, VS, names)
    assert set(faces) == {"single-membrane", "ribosome"} and min(faces.values()) > 0

    root = copick.from_file(str(config))
    objects = {o.name: o for o in root.pickable_objects}
    assert set(objects) == {"single-membrane", "ribosome"}
    assert objects["ribosome"].is_particle and not objects["single-membrane"].is_particle
    assert objects["single-membrane"].label == 1 and objects["ribosome"].label == 2
    run = root.get_run("TS_01")
    [picks] = run.get_picks(object_name="ribosome", user_id="tomoseg", session_id="0")
    xyz, _ = picks.numpy()
    expected = result.coordinates_angstrom()[:, ::-1]  # Z, Y, X voxels -> X, Y, Z Angstrom
    assert np.allclose(np.sort(xyz, axis=0), np.sort(expected, axis=0))
    assert np.allclose(np.sort(xyz[:, 1]), [8 * VS, 15 * VS], atol=0.01)
    assert picks.load().unit == "angstrom" and picks.meta.voxel_spacing == VS
    [multi] = run.get_segmentations(name="tomoseg", is_multilabel=True)
    assert multi.voxel_size == VS and np.array_equal(multi.numpy(), labels)
    [binary] = run.get_segmentations(name="single-membrane", is_multilabel=False)
    assert np.array_equal(binary.numpy(), (labels == 1).astype(np.uint8))
    assert [v.voxel_size for v in run.voxel_spacings] == [VS]
    [mesh] = run.get_meshes(object_name="ribosome")
    geometry = mesh.mesh.to_geometry()
    r = 3.0 * VS  # two balls of radius 3 voxels, in Angstrom
    assert geometry.is_watertight and geometry.volume > 0
    assert geometry.volume == pytest.approx(2 * 4 / 3 * np.pi * r**3, rel=0.25)
    centre = geometry.vertices.mean(axis=0)  # X, Y, Z Angstrom: midway between the balls
    assert np.allclose(centre, [(9 + 24) / 2 * VS, (8 + 15) / 2 * VS, 10 * VS], atol=0.5 * VS)
    assert (
        mesh_volume(geometry.vertices, geometry.faces)
        > 0
        < mesh_area(geometry.vertices, geometry.faces)
    )


def test_labels_that_the_project_uses_already_are_remapped(tmp_path, labels):
    config = tmp_path / "copick.json"
    root = copick_io.open_project(config, create=True)
    root.new_object("carbon", is_particle=False, label=1)
    root.save_config(str(config))
    names = {1: "membrane", 2: "ribosome"}
    export_segmentation(config, "r1", labels, VS, names, multilabel_name="merged")
    root = copick.from_file(str(config))
    label_of = {o.name: o.label for o in root.pickable_objects}
    assert label_of == {"carbon": 1, "ribosome": 2, "membrane": 3}
    [seg] = root.get_run("r1").get_segmentations(name="merged")
    stored = seg.numpy()
    assert np.array_equal(stored == 3, labels == 1) and np.array_equal(stored == 2, labels == 2)
    back, names_back = read_copick_segmentation(config, "r1", "merged")
    assert np.array_equal(back.data, stored) and back.voxel_size == (VS, VS, VS)
    assert names_back[3] == "membrane" and names_back[2] == "ribosome"


def test_existing_data_is_kept_unless_overwrite(tmp_path, labels):
    config = tmp_path / "copick.json"
    export_segmentation(config, "r1", labels == 1, VS, ["bg", "membrane"])
    with pytest.raises(OutputExistsError, match="copick segmentation membrane"):
        export_segmentation(config, "r1", labels == 1, VS, ["bg", "membrane"])
    thinner = np.zeros_like(labels)
    thinner[3] = 1
    export_segmentation(config, "r1", thinner, VS, ["bg", "membrane"], overwrite=True)
    back, _ = read_copick_segmentation(config, "r1", "membrane")
    assert np.array_equal(back.data, thinner)


def test_a_tomogram_in_a_copick_project_reads_as_our_array_with_its_voxel_size(tmp_path):
    config = tmp_path / "copick.json"
    root = copick_io.open_project(config, create=True)
    run = root.new_run("TS_7")
    data = np.random.default_rng(0).normal(size=(12, 20, 28)).astype(np.float32)
    run.new_voxel_spacing(13.48).new_tomogram("wbp").from_numpy(data)  # written by copick
    tomo = read_copick_tomogram(config, "TS_7")
    assert np.array_equal(tomo.data, data) and tomo.voxel_size == (13.48, 13.48, 13.48)
    assert tomo.extra["copick"]["tomo_type"] == "wbp"
    # one written by us reads back in copick too, and then there are two to choose from
    assert export_tomogram(config, "TS_7", data[::-1].copy(), 13.48) == 13.48
    with pytest.raises(TomosegError, match="several tomograms .*--tomo-type"):
        read_copick_tomogram(config, "TS_7")
    ours = copick.from_file(str(config)).get_run("TS_7").get_voxel_spacing(13.48)
    assert np.array_equal(ours.get_tomograms("tomoseg")[0].numpy(), data[::-1])
    with pytest.raises(TomosegError, match="no run 'nope'.*TS_7"):
        read_copick_tomogram(config, "nope")
    with pytest.raises(TomosegError, match="no tomogram at 10 A"):
        read_copick_tomogram(config, "TS_7", voxel_size=10.0)


def test_voxel_sizes_that_copick_cannot_hold_are_refused(tmp_path, labels):
    config = tmp_path / "copick.json"
    with pytest.raises(TomosegError, match="one voxel spacing"):
        export_segmentation(config, "r", labels, (16.0, 8.0, 8.0), ["bg", "a", "b"])
    with pytest.raises(TomosegError, match="unknown.*--voxel-size"):
        export_segmentation(config, "r", labels, None, ["bg", "a", "b"])
    assert not config.exists()  # refused before anything was written


def test_without_copick_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_copick(name, *args, **kwargs):
        if name == "copick" or name.startswith("copick."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_copick)
    with pytest.raises(TomosegError, match=r"pip install napari-tomoseg\[copick\]"):
        copick_io.open_project(tmp_path / "copick.json", create=True)


# -- the command line -----------------------------------------------------------------------------
def test_cli_exports_pick_and_merge_outputs_and_imports_them_back(tmp_path, labels, capsys):
    from napari_tomoseg import cli
    from napari_tomoseg.applying.picking import read_star
    from napari_tomoseg.data.io import read_tomogram, source_label, write_labels, write_mrc

    def run(*argv):
        return cli.main(["--quiet", *map(str, argv)])

    merged = tmp_path / "tomo1_merged.mrc"
    write_labels(merged, labels, VS, header_texts=[source_label("tomo1.mrc")])
    star = tmp_path / "ribosomes.star"
    assert (
        run(
            "pick",
            merged,
            "--feature",
            2,
            "--min-size",
            20,
            "--names",
            "bg,membrane,ribosome",
            "-o",
            star,
        )
        == 0
    )
    config = tmp_path / "copick" / "project.json"
    names = "background,single_membrane,ribosome"
    argv = ["copick", "export", config, "--picks", star, "--mask", merged, "--names", names]
    assert run(*argv, "--meshes") == 0
    out = capsys.readouterr().out
    assert "run tomo1: picks ribosome (2)" in out and "segmentation merged" in out

    root = copick.from_file(str(config))
    assert (config.parent / "overlay" / "ExperimentRuns" / "tomo1").is_dir()
    run1 = root.get_run("tomo1")
    xyz, _ = run1.get_picks(object_name="ribosome")[0].numpy()
    table = read_star(star)
    expected = np.array([p.position() for p in table.particles])[:, ::-1] * VS
    assert np.allclose(np.sort(xyz, axis=0), np.sort(expected, axis=0))
    [seg] = run1.get_segmentations(name="merged", is_multilabel=True)
    assert np.array_equal(seg.numpy(), labels) and seg.voxel_size == VS
    assert {m.pickable_object_name for m in run1.meshes} == {"single-membrane", "ribosome"}
    assert run(*argv) == cli.EXIT_INPUT  # exists: refused
    assert "add --overwrite" in capsys.readouterr().err

    tomo = np.random.default_rng(1).normal(size=labels.shape).astype(np.float32)
    write_mrc(tmp_path / "tomo1.mrc", tomo, VS)
    assert run("copick", "export", config, "--tomogram", tmp_path / "tomo1.mrc") == 0
    assert run("copick", "import", config, "--run", "tomo1", "-o", tmp_path / "back.mrc") == 0
    back = read_tomogram(tmp_path / "back.mrc")
    assert np.array_equal(back.data, tomo) and back.voxel_size == (VS, VS, VS)
    seg_out = tmp_path / "seg.mrc"
    assert (
        run(
            "copick", "import", config, "--run", "tomo1", "--segmentation", "merged", "-o", seg_out
        )
        == 0
    )
    assert "1 = single-membrane, 2 = ribosome" in capsys.readouterr().out
    assert np.array_equal(read_tomogram(seg_out).data, labels)
    # the imported segmentation names its run, so picks from it match it
    assert (
        run("pick", seg_out, "--feature", 2, "--min-size", 20, "-o", tmp_path / "again.star") == 0
    )
    assert read_star(tmp_path / "again.star").tomo_name == "tomo1"


def test_cli_copick_options_have_help_and_defaults(capsys):
    import argparse

    from napari_tomoseg import cli

    parser = cli.build_parser()
    copick_parser = parser._subparsers._group_actions[0].choices["copick"]
    actions = copick_parser._subparsers._group_actions[0].choices
    assert set(actions) == {"export", "import"}
    for name, sub in actions.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"tomoseg copick {name} {action.option_strings}"
    with pytest.raises(SystemExit):
        cli.main(["copick", "export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: tomoseg)" in text and "(default: 0)" in text and "(default: 1)" in text


def test_cli_without_copick_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    from napari_tomoseg import cli

    def missing():
        raise TomosegError(f"copick ... not installed: {copick_io.INSTALL_HINT}")

    monkeypatch.setattr(copick_io, "require_copick", missing)
    code = cli.main(["copick", "import", str(tmp_path / "c.json"), "--run", "r", "-o", "x.mrc"])
    assert code == cli.EXIT_INPUT
    assert "pip install napari-tomoseg[copick]" in capsys.readouterr().err


def test_merged_masks_name_their_classes_for_pick_and_copick(tmp_path, labels, capsys):
    from napari_tomoseg import cli
    from napari_tomoseg.applying.picking import read_star
    from napari_tomoseg.data.io import class_names_of, read_tomogram, source_label, write_mrc

    def run(*argv):
        return cli.main(["--quiet", *map(str, argv)])

    maps = []
    for value, name in ((1, "single_membrane"), (2, "ribosome")):
        path = tmp_path / f"tomo1_{name}.mrc"
        prob = (labels == value).astype(np.float32)
        write_mrc(path, prob, VS, header_texts=[source_label("tomo1.mrc")])  # as apply does
        maps.append(path)
    merged = tmp_path / "tomo1_merged.mrc"
    assert run("merge", *maps, "-o", merged) == 0
    assert class_names_of(read_tomogram(merged)) == ["background", "single_membrane", "ribosome"]
    assert run("pick", merged, "--feature", 2, "--min-size", 20, "-o", tmp_path / "r.star") == 0
    assert {p.class_name for p in read_star(tmp_path / "r.star").particles} == {"ribosome"}
    config = tmp_path / "copick.json"
    assert run("copick", "export", config, "--mask", merged, "--run", "tomo1") == 0
    root = copick.from_file(str(config))
    assert {o.name for o in root.pickable_objects} == {"single-membrane", "ribosome"}
    out = tmp_path / "seg.mrc"
    assert (
        run("copick", "import", config, "--run", "tomo1", "--segmentation", "merged", "-o", out)
        == 0
    )
    back = read_tomogram(out)
    assert class_names_of(back) == ["background", "single-membrane", "ribosome"]


def test_bad_names_and_empty_masks_are_clear_errors(tmp_path, labels):
    config = tmp_path / "copick.json"
    with pytest.raises(TomosegError, match="cannot name a copick run"):
        export_segmentation(config, "a/b", labels, VS, ["bg", "a", "b"])
    with pytest.raises(TomosegError, match="empty"):
        export_segmentation(config, "r", np.zeros_like(labels), VS)
    with pytest.raises(TomosegError, match="no copick project"):
        read_copick_tomogram(tmp_path / "none.json", "r")
    export_segmentation(config, "r", labels, VS, ["bg", "a", "b"])
    with pytest.raises(TomosegError, match="run r has no tomogram"):
        read_copick_tomogram(config, "r")  # a run with a segmentation and no tomogram
