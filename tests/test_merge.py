"""Merging probability maps into one multi-level mask (EMAN2 mergetomoseg rule)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from napari_tomoseg.applying.merge import (
    DEFAULT_COLORS,
    MergeInput,
    iter_merge,
    merge_probability_maps,
)
from napari_tomoseg.data.probability import quantize_probabilities
from napari_tomoseg.errors import TomosegError
from napari_tomoseg.progress import drive

ROOT = Path(__file__).resolve().parents[1]


def maps(*values):
    """One (1, 1, N) map per argument from lists of probabilities."""
    return [np.asarray(v, dtype=np.float32).reshape(1, 1, -1) for v in values]


def test_rule_thresholds_weights_ties_and_unclaimed():
    a, b, c = maps(
        [0.9, 0.6, 0.4, 0.7, 0.55, 0.2],
        [0.8, 0.7, 0.45, 0.7, 0.9, 0.3],
        [0.1, 0.1, 0.1, 0.1, 0.6, 0.35],
    )
    result = merge_probability_maps(
        [
            MergeInput(a, "microtubule", threshold=0.5),
            MergeInput(b, "carbon", threshold=0.5),
            MergeInput(c, "membrane", threshold=0.3, weight=2.0),
        ]
    )
    # voxel 0: a 0.9 > b 0.8 -> 1; voxel 1: b wins; voxel 2: nobody reaches its threshold;
    # voxel 3: a and b tie at 0.7 -> the earlier map; voxel 4: c's weighted 1.2 beats b 0.9;
    # voxel 5: only c reaches its (lower) threshold
    assert result.mask.ravel().tolist() == [1, 2, 0, 1, 3, 3]
    assert result.mask.dtype == np.uint8
    assert result.names == ["background", "microtubule", "carbon", "membrane"]
    assert result.voxels == {0: 1, 1: 2, 2: 1, 3: 2}


def test_a_weight_can_hand_a_voxel_to_a_weaker_map_only_above_its_threshold():
    a, b = maps([0.9, 0.9], [0.6, 0.45])
    result = merge_probability_maps(
        [MergeInput(a, "a"), MergeInput(b, "b", weight=2.0, threshold=0.5)]
    )
    assert result.mask.ravel().tolist() == [2, 1]  # 1.2 > 0.9; but 0.45 < 0.5 never claims


def test_eman2_default_threshold_of_point_eight_can_be_chosen():
    (a,) = maps([0.6, 0.85])
    low = merge_probability_maps([MergeInput(a, "f")])
    eman2 = merge_probability_maps([MergeInput(a, "f", threshold=0.8)])
    assert low.mask.ravel().tolist() == [1, 1]
    assert eman2.mask.ravel().tolist() == [0, 1]


def test_stored_and_float_maps_merge_alike_and_chunks_do_not_matter():
    rng = np.random.default_rng(0)
    floats = [rng.random((7, 9, 11)).astype(np.float32) for _ in range(3)]
    stored = [quantize_probabilities(f) for f in floats]
    inputs_f = [MergeInput(f, f"m{i}", threshold=0.3 + 0.1 * i) for i, f in enumerate(floats)]
    inputs_q = [MergeInput(q, f"m{i}", threshold=0.3 + 0.1 * i) for i, q in enumerate(stored)]
    one = merge_probability_maps(inputs_f, z_chunk=100)
    chunked = merge_probability_maps(inputs_f, z_chunk=2)
    assert np.array_equal(one.mask, chunked.mask)
    q = merge_probability_maps(inputs_q, z_chunk=3)
    assert (q.mask == one.mask).mean() > 0.95  # only voxels within 1/100 of a threshold or tie


@settings(max_examples=40, deadline=None)
@given(
    data=hnp.arrays(np.float32, (3, 2, 3, 4), elements=st.floats(0, 1, width=32)),
    thresholds=st.lists(st.floats(0, 1), min_size=3, max_size=3),
    weights=st.lists(st.floats(0.1, 5), min_size=3, max_size=3),
)
def test_rule_matches_a_voxel_by_voxel_reference(data, thresholds, weights):
    inputs = [
        MergeInput(data[i], f"f{i}", t, w) for i, (t, w) in enumerate(zip(thresholds, weights))
    ]
    got = merge_probability_maps(inputs, z_chunk=1).mask
    for idx in np.ndindex(data.shape[1:]):
        best, label = -1.0, 0
        for i in range(3):
            p = float(data[(i, *idx)])
            score = np.float32(weights[i]) * np.float32(p)
            if p >= np.float32(thresholds[i]) and score > best:
                best, label = score, i + 1
        assert got[idx] == label


def test_colours_default_distinct_and_kept_when_given():
    a, b, c = maps([0.9], [0.1], [0.2])
    result = merge_probability_maps(
        [MergeInput(a, "a"), MergeInput(b, "b", color=DEFAULT_COLORS[1]), MergeInput(c, "c")]
    )
    assert result.colors[2] == DEFAULT_COLORS[1]
    assert len(set(result.colors.values())) == 3
    meta = result.layer_metadata()
    assert meta["class_names"] == {0: "background", 1: "a", 2: "b", 3: "c"}
    assert meta["class_colors"] == result.colors
    assert meta["merge"]["thresholds"] == [0.5, 0.5, 0.5]


def test_more_than_255_maps_give_uint16():
    n = 300
    data = np.zeros((n, 1, 1, n), dtype=np.float32)
    for i in range(n):
        data[i, 0, 0, i] = 1.0
    result = merge_probability_maps([MergeInput(data[i], f"f{i}") for i in range(n)])
    assert result.mask.dtype == np.uint16
    assert result.mask.ravel().tolist() == list(range(1, n + 1))


def test_output_into_a_given_array_and_stop():
    a, b = (np.full((6, 4, 4), v, np.float32) for v in (0.7, 0.6))
    out = np.full((6, 4, 4), 9, dtype=np.uint8)
    result = merge_probability_maps([MergeInput(a, "a"), MergeInput(b, "b")], out=out)
    assert result.mask is out and (out == 1).all()
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 2

    out2 = np.zeros((6, 4, 4), dtype=np.uint8)
    gen = iter_merge([MergeInput(a, "a")], z_chunk=2, should_stop=stop, out=out2)
    stopped = drive(gen)
    assert stopped.stopped and stopped.slices_done == 4
    assert (out2[:4] == 1).all() and (out2[4:] == 0).all()


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda a, b: [], "at least one"),
        (lambda a, b: [MergeInput(a, "x"), MergeInput(b[:, :2], "y")], "shape"),
        (lambda a, b: [MergeInput(a, "x"), MergeInput(b, "x")], "own name"),
        (lambda a, b: [MergeInput(a, "x", threshold=1.5)], "threshold"),
        (lambda a, b: [MergeInput(a, "x", weight=0)], "weight"),
        (lambda a, b: [MergeInput(a[0], "x")], "3D"),
        (lambda a, b: [MergeInput(a, "background")], "label 0"),
        (lambda a, b: [a], "MergeInput"),
    ],
)
def test_bad_inputs_are_refused(bad, message):
    a = np.zeros((2, 3, 4), np.float32)
    b = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(TomosegError, match=message):
        merge_probability_maps(bad(a, b))


def test_merge_and_picking_do_not_import_torch():
    """Merging and picking read stored probabilities (napari_tomoseg.data.probability), not the
    inference package, so they run where torch is not installed or slow to import."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    code = (
        "import sys, napari_tomoseg.applying.merge, napari_tomoseg.applying.picking\n"
        "heavy = ('torch', 'napari_tomoseg.applying.inference')\n"
        "loaded = [m for m in heavy if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
