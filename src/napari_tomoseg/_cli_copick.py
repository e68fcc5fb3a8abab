"""``tomoseg copick export`` and ``tomoseg copick import``: the command line of
:mod:`napari_tomoseg.applying.copick_io` (kept apart from :mod:`napari_tomoseg.cli`, which
adds them to its parser)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .cli import EXIT_OK, HelpWithDefaults, ProgressPrinter, _writes_csv
from .errors import TomosegError


def _copick_export_picks(args: argparse.Namespace, path: str) -> str:
    from .applying.copick_io import export_picks
    from .applying.picking import read_csv, read_star

    table = read_csv(path) if _writes_csv(path) else read_star(path)
    run = args.run or table.tomo_name
    if not run:
        raise TomosegError(f"{path} does not name its tomogram; give the run with --run.")
    counts = export_picks(
        args.config,
        run,
        table,
        args.voxel_size or table.voxel_size,
        user=args.user,
        session=args.session,
        overwrite=args.overwrite,
    )
    found = ", ".join(f"{name} ({n})" for name, n in counts.items()) or "none"
    return f"run {run}: picks {found} from {path}"


def _copick_export_mask(args: argparse.Namespace, path: str) -> list[str]:
    from .applying.copick_io import export_meshes, export_segmentation
    from .data.io import class_names_of, output_feature, read_tomogram, source_name

    mask = read_tomogram(path)
    source = source_name(mask)
    run = args.run or source
    if not run:
        raise TomosegError(f"{path} does not record its tomogram; give the run with --run.")
    feature = output_feature(path, source, "_mask")  # tomo1_membrane_mask.mrc: membrane
    names: Any = args.names.split(",") if args.names else class_names_of(mask)
    if names is None:  # one feature: named after the file; several: feature 1, 2, ...
        names = {1: feature} if int(mask.data.max()) == 1 else None
    vs = args.voxel_size or mask.voxel_size
    keep = {"user": args.user, "session": args.session, "overwrite": args.overwrite}
    name = export_segmentation(
        args.config,
        run,
        mask.data,
        vs,
        names,
        multilabel_name=args.segmentation_name or feature,
        **keep,
    )
    done = [f"run {run}: segmentation {name} from {path}"]
    if args.meshes:
        faces = export_meshes(args.config, run, mask.data, vs, names, step=args.mesh_step, **keep)
        done.append(
            f"run {run}: meshes " + ", ".join(f"{n} ({f} faces)" for n, f in faces.items())
        )
    return done


def _cmd_copick_export(args: argparse.Namespace, progress: ProgressPrinter) -> int:
    from .applying.copick_io import export_tomogram, open_project
    from .data.io import mrc_stem, read_tomogram

    if not (args.picks or args.mask or args.tomogram):
        raise TomosegError("Nothing to export: give --picks, --mask and/or --tomogram.")
    open_project(args.config, create=True, overlay=args.overlay)
    done = [_copick_export_picks(args, path) for path in args.picks or ()]
    for path in args.mask or ():
        done += _copick_export_mask(args, path)
    if args.tomogram:
        tomo = read_tomogram(args.tomogram)
        run = args.run or mrc_stem(args.tomogram)
        spacing = export_tomogram(
            args.config,
            run,
            tomo.data,
            args.voxel_size or tomo.voxel_size,
            tomo_type=args.tomo_type,
            overwrite=args.overwrite,
        )
        done.append(f"run {run}: tomogram {args.tomo_type} at {spacing:g} A")
    print(f"Wrote to the copick project {args.config} (user {args.user}, session {args.session}):")
    for line in done:
        print(f"  {line}")
    return EXIT_OK


def _cmd_copick_import(args: argparse.Namespace, progress: ProgressPrinter) -> int:
    from .applying.copick_io import read_copick_segmentation, read_copick_tomogram
    from .data.io import SOURCE_LABEL, classes_label, write_labels, write_mrc

    if args.segmentation:
        labels, names = read_copick_segmentation(
            args.config,
            args.run,
            args.segmentation,
            user=args.user,
            session=args.session,
            voxel_size=args.voxel_size,
        )
        top = int(labels.data.max())
        classes = ["background"] + [names.get(v, f"feature {v}") for v in range(1, top + 1)]
        write_labels(
            args.output,
            labels.data,
            labels.voxel_size,
            overwrite=args.overwrite,  # tomoseg pick names the picks after the run and objects
            header_texts=[SOURCE_LABEL + args.run, *classes_label(classes)],
        )
        listed = ", ".join(f"{v} = {n}" for v, n in sorted(names.items()) if v <= top)
        print(f"Wrote {args.output} (labels {listed or 'none'}; {labels.voxel_size.describe()})")
        return EXIT_OK
    tomo = read_copick_tomogram(
        args.config, args.run, tomo_type=args.tomo_type, voxel_size=args.voxel_size
    )
    write_mrc(args.output, tomo.data, tomo.voxel_size, overwrite=args.overwrite)
    kind = tomo.extra["copick"]["tomo_type"]
    print(f"Wrote {args.output} (tomogram {kind} of run {args.run}, {tomo.voxel_size.describe()})")
    return EXIT_OK


def add_copick_parsers(command: Callable[..., argparse.ArgumentParser]) -> None:
    """``tomoseg copick export`` and ``tomoseg copick import``."""
    p = command(
        "copick",
        help="export to and import from a copick project (CryoET Data Portal layout)",
        description="Exchange with a copick project: picks, masks, meshes and tomograms go "
        "in, tomograms and segmentations come out. Needs napari-tomoseg[copick]. See "
        "docs/formats.md.",
    )
    sub = p.add_subparsers(
        dest="copick_command", metavar="ACTION", required=True, help="export or import"
    )
    e = sub.add_parser(
        "export",
        formatter_class=HelpWithDefaults,
        help="write picks, masks, meshes or a tomogram into a copick project",
        description="Write into the copick project of CONFIG (a local one is made there if "
        "there is none). Each input goes to the run of its tomogram (the STAR file's "
        "_rlnTomoName, the tomogram a mask records) unless --run is given. Feature names "
        "become object names in lower case with hyphens (single_membrane -> "
        "single-membrane); picked features are particles, masks' features are not.",
    )
    e.add_argument("config", help="the copick project's config file (JSON)")
    e.add_argument("--picks", nargs="+", metavar="FILE", help=".star or .csv from 'tomoseg pick'")
    e.add_argument("--mask", nargs="+", metavar="MRC", help="masks from apply or merge")
    e.add_argument("--tomogram", metavar="MRC", help="a tomogram to add (read into memory)")
    e.add_argument("--meshes", action="store_true", help="also write each mask feature's surface")
    e.add_argument("--mesh-step", type=int, default=1, help="voxels per mesh cell (coarser: >1)")
    _copick_common(e, export=True)
    e.add_argument(
        "--names",
        help="comma-separated feature names of the masks, background first (default: those "
        "the mask's header records, as merge writes them; else a one-feature mask is named "
        "after its file, e.g. tomo1_membrane_mask.mrc: membrane)",
    )
    e.add_argument(
        "--segmentation-name",
        help="name of the multilabel segmentation of a mask of several features (default: "
        "the mask's file name, e.g. tomo1_merged.mrc: merged)",
    )
    e.add_argument(
        "--overlay",
        metavar="FOLDER",
        help="where a new project keeps its data (default: 'overlay' beside CONFIG)",
    )
    e.set_defaults(func=_cmd_copick_export)

    i = sub.add_parser(
        "import",
        formatter_class=HelpWithDefaults,
        help="write a copick tomogram or segmentation as MRC",
        description="Read a tomogram (or, with --segmentation, a segmentation) of a run of "
        "the copick project at full resolution and write it as MRC with its voxel size, "
        "ready for the other commands.",
    )
    i.add_argument("config", help="the copick project's config file (JSON)")
    i.add_argument("--run", required=True, help="the run (tomogram) to read")
    i.add_argument("-o", "--output", required=True, help="MRC file to write")
    i.add_argument(
        "--segmentation", metavar="NAME", help="read this segmentation instead of a tomogram"
    )
    _copick_common(i, export=False)
    i.set_defaults(func=_cmd_copick_import)


def _copick_common(p: argparse.ArgumentParser, export: bool) -> None:
    """The options export and import share: who, which tomogram, voxel size, overwrite."""
    from .applying.copick_io import DEFAULT_SESSION, DEFAULT_TOMO_TYPE, DEFAULT_USER

    if export:
        p.add_argument(
            "--run",
            help="the run to write into (default: the tomogram each input records; for "
            "--tomogram its file name)",
        )
        p.add_argument("--user", default=DEFAULT_USER, help="copick user id of the data")
        p.add_argument(
            "--session", default=DEFAULT_SESSION, help="copick session id ('0': a tool's output)"
        )
        p.add_argument("--tomo-type", default=DEFAULT_TOMO_TYPE, help="type of --tomogram")
        p.add_argument(
            "--voxel-size",
            type=float,
            help="the inputs' voxel size in Angstrom (default: each file's own)",
        )
    else:
        p.add_argument("--user", help="user id of the segmentation (default: any)")
        p.add_argument("--session", help="session id of the segmentation (default: any)")
        p.add_argument(
            "--tomo-type", help="the tomogram's type (default: the run's only one), e.g. wbp"
        )
        p.add_argument(
            "--voxel-size",
            type=float,
            help="voxel spacing in Angstrom (default: the run's only one)",
        )
    p.add_argument("--overwrite", action="store_true", help="replace existing data")
