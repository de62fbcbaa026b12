"""``resunet convert INPUT OUTPUT.nii.gz [--series UID]``: any supported study to NIfTI (like dcm2niix)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from resunet.errors import InputError
from resunet.io.atomic import remove_stale_temps
from resunet.io.limits import add_limit_argument, limits_from_args

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a DICOM folder/.zip/file or NIfTI to NIfTI",
        description="Read a study (NIfTI .nii/.nii.gz, a folder of DICOM files with any names, a .zip of"
        " one, or a single (multi-frame) DICOM file) and write it as NIfTI with its exact geometry."
        " With several DICOM series, the one with the most slices is converted unless --series names one.",
    )
    p.add_argument("input", help="NIfTI file, DICOM folder, .zip, or DICOM file")
    p.add_argument("output", nargs="?", help="output .nii or .nii.gz file")
    p.add_argument("--series", metavar="UID", help="SeriesInstanceUID (or key from --list) to convert")
    p.add_argument("--list", action="store_true", help="only list the image series found, then exit")
    add_limit_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from resunet.io.loader import list_series, load_study  # here, not at import: `--help` stays light
    from resunet.io.nifti import is_nifti_path, write_nifti

    if args.list:
        found = list_series(args.input)
        if not found:
            print(f"{args.input}: a NIfTI file (one volume, no DICOM series)")
        for s in found:
            print(s.describe())
        return 0
    if not args.output:
        raise InputError("convert needs an OUTPUT .nii or .nii.gz path (or --list)")
    if not is_nifti_path(args.output):
        raise InputError(f"{args.output}: output name must end in .nii or .nii.gz")
    limits = limits_from_args(args)
    # temps of this output left by a killed earlier run (resunet.io.atomic names them .<name>.*.part*)
    remove_stale_temps(Path(args.output).parent, [Path(args.output).name.split(".")[0]])
    vol = load_study(args.input, series_uid=args.series, limits=limits)
    out = write_nifti(vol, args.output)
    what = f"series {vol.meta.get('series_key')}" if vol.meta.get("format") == "dicom" else "NIfTI"
    print(f"wrote {out} from {what}: {vol.describe_grid()}, dtype {vol.array.dtype}")
    return 0
