"""Exchange with copick projects: picks, segmentations, meshes and tomograms into one,
tomograms and segmentations out of one.

copick (https://github.com/copick/copick) is the exchange layout of the CryoET Data Portal:
a JSON config names the *pickable objects* (name, label, particle or not) and where the
data lie; each *run* (one tomogram's data) holds voxel spacings with their tomograms
(OME-Zarr), picks (JSON, Angstrom), segmentations (OME-Zarr) and meshes (GLB), each
under a *user* and a *session* (``"0"`` marks a tool's output).  This module writes to and
reads from a local (filesystem) project through the ``copick`` library, an optional
dependency (``pip install napari-tomoseg[copick]``).

Conventions (one decision each):

* **Object names** are our feature names in lower case with hyphens (``single_membrane``
  -> ``single-membrane``), as copick requires.  An object the project already has keeps its
  definition (label, colour, particle or not).  A new one is a particle when picks of it
  are written or its name is in :data:`PARTICLE_FEATURES`, else not (membranes, filaments
  as masks, carbon); its label is our label value when that is free, else the next free one.
* **Voxel size**: copick has one voxel spacing (Angstrom) per tomogram, so segmentations,
  meshes and tomograms need isotropic voxels; picks are positions in Angstrom (voxel
  ``i`` at ``i * voxel size``), written for any voxel size.
* **Segmentations**: a mask of one feature is a binary segmentation named after its
  object; a mask of several is one multilabel segmentation whose values are the objects'
  labels (remapped where the project's labels differ from ours).
* **Meshes**: the surface of each feature (:func:`napari_tomoseg.applying.picking.surface_mesh`),
  vertices in Angstrom (X, Y, Z), normals outwards, stored by copick as GLB (trimesh).
* Nothing that exists is replaced without ``overwrite=True``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..colours import default_class_colors
from ..data.io import Tomogram
from ..data.voxels import VoxelSize
from ..errors import OutputExistsError, TomosegError

if TYPE_CHECKING:  # picking (and scipy) load when used: the command line starts faster
    from .picking import Particle, ParticleTable, PickResult

INSTALL_HINT = "pip install napari-tomoseg[copick]"
#: Who writes: the user and session napari-tomoseg's outputs are filed under by default
#: (session "0" marks a tool's output in copick).
DEFAULT_USER = "tomoseg"
DEFAULT_SESSION = "0"
#: The tomogram type written and read by default.
DEFAULT_TOMO_TYPE = "tomoseg"
#: Features that are particles (points) when copick first meets them.
PARTICLE_FEATURES = frozenset({"ribosome", "ribosomes", "particle", "particles"})


def require_copick() -> Any:
    """The ``copick`` module, or a :class:`TomosegError` saying how to install it."""
    try:
        import copick
    except ImportError:
        raise TomosegError(
            f"copick projects need the copick library, which is not installed: {INSTALL_HINT}"
        ) from None
    return copick


def object_name(name: str) -> str:
    """A feature name as a copick object name: lower case, runs of other characters as
    one hyphen (``"Single_membrane"`` -> ``"single-membrane"``)."""
    clean = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")
    if not clean:
        raise TomosegError(f"{name!r} cannot name a copick object: it has no letter or digit.")
    if clean.endswith("-multilabel"):  # copick's mark of a multilabel store
        clean = clean.removesuffix("-multilabel") + "-labels"
    return clean


def copick_id(text: str, what: str) -> str:
    """A user or session id as copick accepts it (no spaces, underscores or slashes)."""
    clean = re.sub(r"[\s_<>:\"/\\|?*]+", "-", str(text)).strip("-")
    if not clean:
        raise TomosegError(f"{text!r} cannot be a copick {what}.")
    return clean


def isotropic_spacing(voxel_size: Any, what: str) -> float:
    """The one voxel spacing (Angstrom) copick files ``what`` under."""
    vs = VoxelSize.parse(voxel_size)
    if vs is None:
        raise TomosegError(
            f"The voxel size of {what} is unknown; copick files data by voxel spacing in "
            "Angstrom. Give it (--voxel-size)."
        )
    if not np.allclose(vs, vs[0], rtol=1e-4):
        raise TomosegError(
            f"{what} has voxels of {tuple(vs)} Angstrom (Z, Y, X); copick has one voxel "
            "spacing per tomogram. Resample to cubic voxels first."
        )
    return round(float(vs[0]), 3)  # copick names folders VoxelSpacing<size:.3f>


# -- the project ------------------------------------------------------------------------------
def open_project(
    config: str | os.PathLike, *, create: bool = False, overlay: str | os.PathLike | None = None
) -> Any:
    """Open the copick project of the JSON ``config``; with ``create``, make a local one
    there first if there is none (its data under ``overlay``, by default the folder
    ``overlay`` beside the config)."""
    copick = require_copick()
    config = Path(config)
    if config.is_file():
        try:
            return copick.from_file(str(config))
        except (ValueError, KeyError, TypeError) as exc:
            raise TomosegError(f"Cannot open the copick project {config}: {exc}") from None
    if not create:
        raise TomosegError(
            f"There is no copick project at {config}: the config file does not exist."
        )
    root = Path(overlay) if overlay is not None else config.parent / "overlay"
    root.mkdir(parents=True, exist_ok=True)
    return copick.new_config(
        str(config), str(root.resolve()), proj_name=config.stem, proj_description="napari-tomoseg"
    )


def _run(root: Any, name: str, *, create: bool) -> Any:
    """The run ``name`` of the project (made when ``create``)."""
    if not name or not name.strip() or any(c in name for c in "/\\\0"):
        raise TomosegError(f"{name!r} cannot name a copick run (empty, or it holds a slash).")
    run = root.get_run(name)
    if run is None and create:
        run = root.new_run(name)
    if run is None:
        names = ", ".join(sorted(r.name for r in root.runs)) or "none"
        raise TomosegError(f"The copick project has no run {name!r} (its runs: {names}).")
    return run


def ensure_object(root: Any, name: str, label: int, *, particle: bool) -> Any:
    """The project's object ``name``; a new one gets ``label`` when free (else the next free
    label) and is a particle when ``particle`` or its name is a known particle."""
    existing = root.get_object(name)
    if existing is not None:
        return existing
    used = {o.label for o in root.pickable_objects if o.label is not None}
    if label in used or label < 1:
        label = max(used, default=0) + 1
    return root.new_object(
        name,
        is_particle=bool(particle or name in PARTICLE_FEATURES),
        label=int(label),
        color=_colour(label),
    )


def _colour(label: int) -> tuple[int, ...]:
    """The RGBA (0-255) colour of a new object: the one napari-tomoseg shows its label in."""
    rgba = default_class_colors(int(label) + 1)[-1]
    return tuple(round(255 * c) for c in rgba)


def ensure_objects(
    root: Any, features: Iterable[tuple[int, str]], *, particle: bool
) -> dict[str, Any]:
    """:func:`ensure_object` for each ``(label, name)``, those whose label is free first, so
    one moved aside never takes the label of the next; returns the object per name."""
    used = {o.label for o in root.pickable_objects}
    known = {o.name for o in root.pickable_objects}
    order = sorted(set(features), key=lambda f: (f[1] not in known, f[0] in used, f))
    return {name: ensure_object(root, name, label, particle=particle) for label, name in order}


def _save_objects(root: Any, config: str | os.PathLike) -> None:
    """Write the project's objects back into its config file."""
    root.save_config(str(config))


def _refuse_existing(found: list, what: str, overwrite: bool) -> None:
    """Refuse to replace ``found`` copick data unless ``overwrite``."""
    if found and not overwrite:
        raise OutputExistsError(what)


# -- writing ----------------------------------------------------------------------------------
def _particles(picks: Sequence[Particle] | PickResult | ParticleTable) -> list[Particle]:
    from .picking import ParticleTable, PickResult

    if isinstance(picks, (PickResult, ParticleTable)):
        return list(picks.particles)
    return list(picks)


def export_picks(
    config: str | os.PathLike,
    run: str,
    picks: Sequence[Particle] | PickResult | ParticleTable,
    voxel_size: Any = None,
    *,
    user: str = DEFAULT_USER,
    session: str = DEFAULT_SESSION,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write particles into run ``run`` as copick picks, one set per feature (object),
    positions in Angstrom (X, Y, Z); returns the count per object.  The voxel size (Z, Y,
    X or one value) comes from ``picks`` when it is a table or result that knows it."""
    if voxel_size is None and hasattr(picks, "voxel_size"):  # a PickResult or ParticleTable
        voxel_size = picks.voxel_size
    vs = VoxelSize.parse(voxel_size)
    if vs is None:
        raise TomosegError(
            "The voxel size of the picks is unknown, so their positions cannot be given in "
            "Angstrom as copick needs. Give it (--voxel-size)."
        )
    user, session = copick_id(user, "user"), copick_id(session, "session")
    groups: dict[str, list[Particle]] = {}
    for p in _particles(picks):
        groups.setdefault(object_name(p.class_name), []).append(p)
    root = open_project(config, create=True)
    the_run = _run(root, run, create=True)
    ensure_objects(root, [(g[0].label, n) for n, g in groups.items()], particle=True)
    for name in groups:
        found = the_run.get_picks(object_name=name, user_id=user, session_id=session)
        _refuse_existing(found, f"copick picks {name} ({user}/{session}) of run {run}", overwrite)
    _save_objects(root, config)
    spacing = float(vs[0]) if np.allclose(vs, vs[0]) else None
    for name, items in groups.items():
        target = the_run.new_picks(name, session, user_id=user, exist_ok=True)
        target.meta.voxel_spacing = spacing
        zyx = np.array([p.position() for p in items], dtype=np.float64) * np.asarray(vs)
        target.from_numpy(
            zyx[:, ::-1],
            instance_ids=np.array([p.component for p in items], dtype=np.int64),
            scores=np.array([p.score for p in items], dtype=np.float64),
        )
    return {name: len(items) for name, items in groups.items()}


def particles_from_points(coords: Any, features: Mapping[str, Sequence[Any]]) -> list[Particle]:
    """Particles from points (Z, Y, X voxels, e.g. a Points layer's data) and their
    per-point ``features``: ``class`` (the feature name; required), and where present
    ``label``, ``size``, ``component`` and ``score``."""
    from .picking import Particle

    zyx = np.asarray(coords, dtype=np.float64).reshape(-1, 3)
    n = len(zyx)
    if "class" not in features or len(features["class"]) != n:
        raise TomosegError("Every point needs its feature name (a 'class' feature); pick again.")

    def column(name: str, default: Any) -> list[Any]:
        values = features.get(name)
        return list(values) if values is not None and len(values) == n else [default] * n

    return [
        Particle(int(lab), str(cls), float(z), float(y), float(x), int(size), int(comp), float(sc))
        for (z, y, x), cls, lab, size, comp, sc in zip(
            zyx,
            features["class"],
            column("label", 1),
            column("size", 0),
            column("component", 0),
            column("score", 1.0),
        )
    ]


def _features(mask: np.ndarray, names: Any) -> dict[int, str]:
    """Object name per label value present in ``mask`` (``names``: index or key = label)."""
    from .picking import _bincount, _class_name

    counts = _bincount(np.asarray(mask), 1)
    return {v: object_name(_class_name(names, v)) for v in range(1, len(counts)) if counts[v] > 0}


def _check_mask(mask: np.ndarray) -> np.ndarray:
    if not hasattr(mask, "ndim") or mask.ndim != 3:
        raise TomosegError(f"A copick segmentation is 3D (Z, Y, X); got {np.shape(mask)}.")
    if np.dtype(mask.dtype).kind not in "biu":
        raise TomosegError(f"A segmentation holds integer labels, got dtype {mask.dtype}.")
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        return mask.astype(np.uint8)
    if mask.size and int(mask.min()) < 0:
        raise TomosegError("The mask has negative labels; labels are 0 (background) or more.")
    return mask


def export_segmentation(
    config: str | os.PathLike,
    run: str,
    mask: np.ndarray,
    voxel_size: Any,
    names: Sequence[str] | Mapping[int, str] | None = None,
    *,
    multilabel_name: str = "tomoseg",
    user: str = DEFAULT_USER,
    session: str = DEFAULT_SESSION,
    overwrite: bool = False,
) -> str:
    """Write a label mask into run ``run``: a binary segmentation named after its object
    when it has one feature, else a multilabel one named ``multilabel_name`` whose values
    are the objects' labels.  ``names``: feature name per label (index or key = label).
    Returns the segmentation's name."""
    mask = _check_mask(mask)
    spacing = isotropic_spacing(voxel_size, "the mask")
    user, session = copick_id(user, "user"), copick_id(session, "session")
    features = _features(mask, names)
    if not features:
        raise TomosegError("The mask is empty (no voxel above 0): nothing to write to copick.")
    root = open_project(config, create=True)
    the_run = _run(root, run, create=True)
    objects = ensure_objects(root, features.items(), particle=False)
    multilabel = len(features) > 1
    name = object_name(multilabel_name) if multilabel else next(iter(features.values()))
    found = the_run.get_segmentations(
        name=name, user_id=user, session_id=session, voxel_size=spacing, is_multilabel=multilabel
    )
    what = f"copick segmentation {name} ({user}/{session}) of run {run}"
    _refuse_existing(found, what, overwrite)
    _save_objects(root, config)
    if the_run.get_voxel_spacing(spacing) is None:
        the_run.new_voxel_spacing(spacing)
    seg = the_run.new_segmentation(
        spacing, name, session, is_multilabel=multilabel, user_id=user, exist_ok=True
    )
    lut = np.zeros(int(mask.max()) + 1, dtype=np.uint16)
    for value, feature in features.items():
        lut[value] = objects[feature].label if multilabel else 1
    seg.from_numpy(lut[mask])
    return name


def export_meshes(
    config: str | os.PathLike,
    run: str,
    mask: np.ndarray,
    voxel_size: Any,
    names: Sequence[str] | Mapping[int, str] | None = None,
    *,
    step: int = 1,
    user: str = DEFAULT_USER,
    session: str = DEFAULT_SESSION,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write the surface of each feature of ``mask`` into run ``run`` as a copick mesh
    (vertices in Angstrom, X, Y, Z); returns the faces per object."""
    import trimesh  # comes with copick

    from .picking import surface_mesh

    mask = _check_mask(mask)
    vs = VoxelSize.parse(voxel_size)
    if vs is None:
        isotropic_spacing(None, "the mask")  # raises with the advice
    user, session = copick_id(user, "user"), copick_id(session, "session")
    features = _features(mask, names)
    root = open_project(config, create=True)
    the_run = _run(root, run, create=True)
    ensure_objects(root, features.items(), particle=False)
    for name in features.values():
        found = the_run.get_meshes(object_name=name, user_id=user, session_id=session)
        _refuse_existing(found, f"copick mesh {name} ({user}/{session}) of run {run}", overwrite)
    _save_objects(root, config)
    faces_per_object = {}
    for value, name in features.items():
        vertices, faces = surface_mesh(mask, label=value, step=step)
        xyz = (vertices * np.asarray(vs))[:, ::-1]
        target = the_run.new_mesh(name, session, user_id=user, exist_ok=True)
        # swapping Z and X mirrors the mesh: reverse the faces to keep normals outwards
        target.mesh = trimesh.Trimesh(xyz, faces[:, ::-1], process=False)
        target.store()
        faces_per_object[name] = len(faces)
    return faces_per_object


def export_tomogram(
    config: str | os.PathLike,
    run: str,
    data: np.ndarray,
    voxel_size: Any,
    *,
    tomo_type: str = DEFAULT_TOMO_TYPE,
    overwrite: bool = False,
) -> float:
    """Write a tomogram into run ``run`` (OME-Zarr with copick's pyramid of 3 levels, as
    float32; it is read into memory); returns its voxel spacing."""
    if not hasattr(data, "ndim") or data.ndim != 3:
        raise TomosegError(f"A copick tomogram is 3D (Z, Y, X); got {np.shape(data)}.")
    spacing = isotropic_spacing(voxel_size, "the tomogram")
    tomo_type = object_name(tomo_type)
    root = open_project(config, create=True)
    the_run = _run(root, run, create=True)
    vsp = the_run.get_voxel_spacing(spacing) or the_run.new_voxel_spacing(spacing)
    found = vsp.get_tomograms(tomo_type)
    _refuse_existing(found, f"copick tomogram {tomo_type} at {spacing} A of run {run}", overwrite)
    tomo = found[0] if found else vsp.new_tomogram(tomo_type)
    tomo.from_numpy(np.asarray(data, dtype=np.float32))
    return spacing


# -- reading ----------------------------------------------------------------------------------
def _choose(items: list, describe: Any, what: str, hint: str) -> Any:
    """The one item of ``items``, or an error listing them and naming the option."""
    if len(items) == 1:
        return items[0]
    listed = ", ".join(sorted(str(describe(i)) for i in items)) or "none"
    if not items:
        raise TomosegError(f"The run has no {what} (there are: {listed}).")
    raise TomosegError(f"The run has several {what}s ({listed}); choose one with {hint}.")


def _voxel_spacing(the_run: Any, voxel_size: float | None) -> Any:
    """The voxel spacing of the run's tomograms: the one at ``voxel_size``, or its only one."""
    spacings = [v for v in the_run.voxel_spacings if v.tomograms]
    if not spacings:
        raise TomosegError(f"The run {the_run.name} has no tomogram.")
    if voxel_size is not None:
        spacings = [v for v in spacings if abs(v.voxel_size - float(voxel_size)) < 1e-3]
        if not spacings:
            known = ", ".join(f"{v.voxel_size:g}" for v in the_run.voxel_spacings) or "none"
            raise TomosegError(
                f"The run {the_run.name} has no tomogram at {voxel_size:g} A (it has: {known})."
            )
    return _choose(spacings, lambda v: f"{v.voxel_size:g} A", "voxel spacing", "--voxel-size")


def _full_resolution(item: Any, what: str) -> np.ndarray:
    """The full-resolution array of a copick tomogram or segmentation (copick refuses one
    that does not fit in memory: say so)."""
    try:
        return np.asarray(item.numpy())
    except ValueError as exc:
        raise TomosegError(f"Cannot read {what}: {exc}") from None


def read_copick_tomogram(
    config: str | os.PathLike,
    run: str,
    *,
    tomo_type: str | None = None,
    voxel_size: float | None = None,
) -> Tomogram:
    """The tomogram ``tomo_type`` at ``voxel_size`` (Angstrom) of run ``run`` (either may
    be left out when the run has only one), at full resolution, with its voxel size."""
    the_run = _run(open_project(config), run, create=False)
    spacing = _voxel_spacing(the_run, voxel_size)
    tomos = spacing.tomograms
    if tomo_type is not None:
        tomos = [t for t in tomos if t.tomo_type == tomo_type]
        if not tomos:
            known = ", ".join(t.tomo_type for t in spacing.tomograms)
            raise TomosegError(f"The run {run} has no tomogram {tomo_type!r} (it has: {known}).")
    tomo = _choose(tomos, lambda t: t.tomo_type, "tomogram", "--tomo-type")
    return Tomogram(
        data=_full_resolution(tomo, f"the tomogram {tomo.tomo_type} of run {run}"),
        voxel_size=VoxelSize.parse(float(spacing.voxel_size)),
        extra={"copick": {"config": str(config), "run": run, "tomo_type": tomo.tomo_type}},
    )


def read_copick_segmentation(
    config: str | os.PathLike,
    run: str,
    name: str | None = None,
    *,
    user: str | None = None,
    session: str | None = None,
    voxel_size: float | None = None,
) -> tuple[Tomogram, dict[int, str]]:
    """A segmentation of run ``run`` (``name``, ``user``, ``session``, ``voxel_size`` choose
    among several) as labels with its voxel size, and the object name of each label value
    (a binary segmentation is 0 / 1, named after its object)."""
    root = open_project(config)
    the_run = _run(root, run, create=False)
    query = {"name": name, "user_id": user, "session_id": session}
    found = the_run.get_segmentations(**{k: v for k, v in query.items() if v is not None})
    if voxel_size is not None:
        found = [s for s in found if abs(s.voxel_size - float(voxel_size)) < 1e-3]
    seg = _choose(
        found,
        lambda s: f"{s.name} ({s.user_id}/{s.session_id}, {s.voxel_size:g} A)",
        "segmentation",
        "--segmentation, --user, --session or --voxel-size",
    )
    data = _full_resolution(seg, f"the segmentation {seg.name} of run {run}")
    if seg.is_multilabel:
        names = {int(o.label): o.name for o in root.pickable_objects if o.label is not None}
    else:
        names = {1: seg.name}
    tomogram = Tomogram(
        data=data,
        voxel_size=VoxelSize.parse(float(seg.voxel_size)),
        extra={"copick": {"config": str(config), "run": run, "segmentation": seg.name}},
    )
    return tomogram, names


def run_names(config: str | os.PathLike) -> list[str]:
    """The runs of a copick project, sorted."""
    return sorted(r.name for r in open_project(config).runs)
