"""Build the PolNet scenes that ``benchmarks/other_simulator.py`` scores the networks on.

    python benchmarks/polnet_scenes.py --polnet PATH/TO/polnet --out SCENES [NAME ...]

Run with the Python of a virtual environment of its own that has PolNet's dependencies
(PolNet, github.com/anmartinezs/polnet, commit 73e613c, is imported from ``--polnet``, its
source tree; it is not a dependency of napari-tomoseg and nothing of it is copied here).
Only PolNet's scene stage runs: each scene is written as ``SCENES/NAME/density.npy``
((Z, Y, X) float32, Z along the beam, matter positive), ``labels.npy`` (uint8, the values
of :data:`LABEL_VALUES`) and ``scene.json`` (voxel size, what was asked and made, voxel
counts); our own ``image_density`` tomographs them later.  Seeded: the same command gives
the same scenes.  NAME: any of :data:`SCENES` (default: all four, about 6 min on 2 cores).

What this driver does otherwise than PolNet's own scripts (PolNet's files are not edited):

* the microtubule template box at 10 A is widened from 18 to 32 voxels (18 clips the ring
  of protofilaments);
* counts, not occupancies, are asked for: membranes are inserted one at a time, filament
  networks stop at N polymers, and a protein's occupancy target is N copies of its volume;
* membrane radii are capped (:data:`MEMBRANE_MAX_RADIUS_A`; PolNet's own limit makes most
  membranes sheets spanning the volume), and a membrane with fewer than 0.1 % of the
  volume's voxels in its band (a sliver at the border) is drawn again.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

VOXEL_SIZE_A = 10.0
MT_BOX = 32  # voxels: the widened microtubule template box
#: Caps of a sphere's radius, an ellipsoid's semi-axes and both of a torus's radii.
MEMBRANE_MAX_RADIUS_A = {"sphere": 800.0, "ellipsoid": 800.0, "toroid": 500.0}
#: Label values written (the same in every scene); other_simulator.py's --classes maps them.
LABEL_VALUES = {"membrane": 1, "actin": 2, "microtubule": 3, "ribosome": 4, "protein": 5}
#: The scenes of docs/benchmarks.md: seed, shape and the count of each thing asked for.
SCENES: dict[str, dict[str, Any]] = {
    "s1": {
        "seed": 1,
        "shape_zyx": (100, 256, 256),
        "membranes": {"sphere": 3, "ellipsoid": 3, "toroid": 3},
        "filaments": {"mt": 8},
        "proteins": {"4v4r": 16},
    },
    "scene_full": {
        "seed": 2,
        "shape_zyx": (100, 256, 256),
        "membranes": {"sphere": 3, "ellipsoid": 3, "toroid": 2},
        "filaments": {"mt": 6},
        "proteins": {},
    },
    "scene_small_actin": {
        "seed": 3,
        "shape_zyx": (64, 128, 128),
        "membranes": {"sphere": 1, "ellipsoid": 1, "toroid": 1},
        "filaments": {"actin": 8},
        "proteins": {},
        "actin_min_monomers": 6,  # PolNet's 15 fits 2 of 8 filaments in 128 x 128 x 64
    },
    "s_proteins": {
        "seed": 4,
        "shape_zyx": (100, 256, 256),
        "membranes": {"sphere": 2, "ellipsoid": 2, "toroid": 1},
        "filaments": {"mt": 4},
        "proteins": {"4v4r": 17, "4cr2": 33, "3ipm": 33, "1qvr": 33, "1bxn": 34, "3gl1": 33},
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"of {', '.join(SCENES)} (default: all)")
    parser.add_argument("--polnet", type=Path, required=True, help="PolNet's source tree")
    parser.add_argument("--out", type=Path, required=True, help="folder for the scene folders")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(SCENES))
    if unknown:
        parser.error(f"unknown scenes {unknown}; known: {', '.join(SCENES)}")
    if not (args.polnet / "src" / "polnet").is_dir() or not (args.polnet / "data").is_dir():
        parser.error(f"{args.polnet} is not PolNet's source tree (no src/polnet and data/)")
    return args


class Driver:
    """PolNet's scene stage with the changes of the module docstring."""

    def __init__(self, polnet: Path) -> None:
        sys.path.insert(0, str(polnet / "src"))
        self.data = polnet / "data"
        self.cap: int | None = None  # polymers a filament network stops at
        self.min_membrane_voxels = 0
        self._patch_polnet()

    def _patch_polnet(self) -> None:
        from polnet.sample.filaments import fiber_unit, flms_factory
        from polnet.sample.filaments.flms_network import NetHelixFiber, NetHelixFiberB
        from polnet.sample.membranes import MbError
        from polnet.sample.membranes.mb_ellipsoid import EllipGen
        from polnet.sample.membranes.mb_sphere import SphGen
        from polnet.sample.membranes.mb_toroid import TorGen

        driver = self

        class WideMTUnit(fiber_unit.MTUnit):
            """PolNet's microtubule unit in a template box of at least MT_BOX voxels."""

            def __init__(self, sph_rad=40, mt_rad=100.5, n_units=13, v_size=1):
                self._MTUnit__sph_rad, self._MTUnit__mt_rad = float(sph_rad), float(mt_rad)
                self._MTUnit__n_units, self._MTUnit__v_size = int(n_units), float(v_size)
                size = max(int(math.ceil(6.0 * (sph_rad / v_size))) - 6, MT_BOX)
                self._MTUnit__size = size + size % 2
                self._MTUnit__tomo, self._MTUnit__surf = None, None
                self._MTUnit__gen_sdimer()

        def capped(base: type, private: str) -> type:
            def add_polymer(self, polymer, occ_mode="volume"):
                base.add_polymer(self, polymer, occ_mode)
                if driver.cap is not None and len(self._pl) >= driver.cap:
                    setattr(self, private, -1.0)  # ends build_network's loop

            return type(base.__name__, (base,), {"add_polymer": add_polymer})

        def at_least(build):
            def wrapped(self, voi_shape, v_size):
                membrane = build(self, voi_shape, v_size)
                if membrane.vol / v_size**3 < driver.min_membrane_voxels:
                    raise MbError("membrane band too small in the volume")
                return membrane

            return wrapped

        for generator in (SphGen, EllipGen, TorGen):
            generator._build = at_least(generator._build)
        flms_factory.MTUnit = WideMTUnit
        flms_factory.NetHelixFiber = capped(NetHelixFiber, "_NetHelixFiber__occ")
        flms_factory.NetHelixFiberB = capped(NetHelixFiberB, "_NetHelixFiberB__occ")

    def add_membranes(self, sample: Any, kind: str, n: int, max_calls: int = 3) -> int:
        """Up to ``n`` membranes of ``kind``, one per PolNet call."""
        from polnet.sample import MbFile

        params = MbFile().load(self.data / "in_mbs" / f"{kind}.mbs")
        params["MB_OCC_RG"] = (1e-9, 1e-9)  # stop after one inserted membrane
        params["MB_MAX_AXIS" if kind == "ellipsoid" else "MB_MAX_RAD"] = MEMBRANE_MAX_RADIUS_A[
            kind
        ]
        got = 0
        for _ in range(n * max_calls):
            if got >= n:
                break
            before = sample._structure_counts.get("membrane", 0)
            sample.add_set_membranes(params=params, max_mbtries=10)
            got += sample._structure_counts.get("membrane", 0) - before
        return got

    def add_filaments(self, sample: Any, kind: str, n: int, min_monomers: int | None) -> int:
        """A filament network of ``kind`` ("mt" or "actin") that stops at ``n`` polymers."""
        from polnet.sample import FlmsFile

        params = FlmsFile().load(self.data / "in_flms" / f"{kind}.flms")
        if min_monomers is not None:
            params["HX_MIN_NMMER"] = min_monomers
        params["HX_PMER_OCC"] = (100.0, 100.0)  # the cap, not the occupancy, stops it
        key = "microtubule" if kind == "mt" else "actin"
        before = sample._structure_counts.get(key, 0)
        self.cap = n
        try:
            sample.add_helicoidal_network(params=params)
        finally:
            self.cap = None
        return sample._structure_counts.get(key, 0) - before

    def add_proteins(self, sample: Any, pdb: str, n: int) -> int:
        """About ``n`` copies of a cytosolic protein (occupancy target: n of its volumes)."""
        from polnet.sample import PnFile
        from polnet.sample.pns import PnGen, PnSAWLCNet
        from polnet.utils.poly import poly_volume

        params = PnFile().load(self.data / "in_10A" / f"{pdb}_10A.pns")
        gen = PnGen.from_params(params, data_path=self.data, surf_dec=0.9)
        gen.set_scale(sample._v_size)
        volume = float(sample._voi.sum()) * sample._v_size**3
        net = PnSAWLCNet(
            voi=sample._voi,
            v_size=sample._v_size,
            l_length=gen.pmer_l * gen.surf_diam,
            m_surf=gen.surf,
            max_p_length=gen.pmer_l_max,
            occ=100.0 * n * poly_volume(gen.surf) / volume,
            over_tolerance=gen.over_tolerance,
            poly=None,
            svol=gen.svol,
            tries_mmer=20,
            tries_pmer=100,
        )
        net.build_network()
        if net.num_mmers == 0:
            return 0
        hold = sample._stamp_network(net, gen.mask, gen.model)
        sample._collect_network_motifs(net, "cprotein", params["MMER_ID"])
        sample._commit_component(
            type_key="cprotein",
            model_name=params["MMER_ID"],
            count=net.num_mmers,
            label_mask=hold,
            hold_vtp=net.vtp,
            hold_skel_vtp=net.get_skel(),
        )
        return net.num_mmers

    def build(self, recipe: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """One scene: its density and labels, (Z, Y, X), and what was made."""
        from polnet.sample import SyntheticSample

        random.seed(recipe["seed"])
        np.random.seed(recipe["seed"])  # noqa: NPY002 (PolNet draws from the global one)
        z, y, x = recipe["shape_zyx"]
        sample = SyntheticSample(shape=[x, y, z], v_size=VOXEL_SIZE_A, offset=[4, 4, 4])
        self.min_membrane_voxels = int(0.001 * x * y * z)
        made: dict[str, dict[str, int]] = {"membranes": {}, "filaments": {}, "proteins": {}}
        for kind, n in recipe["membranes"].items():
            made["membranes"][kind] = self.add_membranes(sample, kind, n)
        for kind, n in recipe["filaments"].items():
            minimum = recipe.get(f"{kind}_min_monomers")
            made["filaments"][kind] = self.add_filaments(sample, kind, n, minimum)
        for pdb, n in recipe["proteins"].items():
            made["proteins"][pdb] = self.add_proteins(sample, pdb, n)
        labels_xyz = np.zeros(sample._labels.shape, dtype=np.uint8)
        for model_name, entity in sample.label_registry:
            labels_xyz[sample._labels == entity] = label_value(model_name)
        density = np.ascontiguousarray(sample._density.transpose(2, 1, 0), dtype=np.float32)
        return density, np.ascontiguousarray(labels_xyz.transpose(2, 1, 0)), made


def label_value(model_name: str) -> int:
    """Our label value of one of PolNet's model names."""
    if model_name in ("sphere", "ellipsoid", "toroid", "curvatubes"):
        return LABEL_VALUES["membrane"]
    named = {"actin": "actin", "mt": "microtubule", "pdb_4v4r": "ribosome"}
    return LABEL_VALUES[named.get(model_name, "protein")]


def write_scene(folder: Path, density: np.ndarray, labels: np.ndarray, info: dict) -> dict:
    """Write one scene folder; returns its scene.json contents."""
    inside, outside = density[labels > 0].mean(), density[labels == 0].mean()
    if inside < outside:
        raise SystemExit(f"{folder.name}: the density is not matter positive")
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "density.npy", density)
    np.save(folder / "labels.npy", labels)
    meta = {
        "voxel_size_A": VOXEL_SIZE_A,
        "simulator": "PolNet, github.com/anmartinezs/polnet commit 73e613c, scene stage only",
        "axes": "(Z, Y, X), Z along the beam",
        "labels": {str(v): k for k, v in LABEL_VALUES.items()},
        **info,
        "label_voxels": {str(v): int((labels == v).sum()) for v in range(6)},
        "density_range": [float(density.min()), float(density.max())],
    }
    (folder / "scene.json").write_text(json.dumps(meta, indent=1))
    return meta


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    driver = Driver(args.polnet)
    for name in args.names or list(SCENES):
        t0 = time.perf_counter()
        recipe = SCENES[name]
        density, labels, made = driver.build(recipe)
        info = {
            "seed": recipe["seed"],
            "asked": {k: recipe[k] for k in ("membranes", "filaments", "proteins")},
            "made": made,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        meta = write_scene(args.out / name, density, labels, info)
        print(
            f"{name}: {density.shape}, made {made}, label voxels {meta['label_voxels']}, "
            f"{info['seconds']} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
