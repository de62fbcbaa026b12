"""Try every DICOM file of pydicom's test data (pydicom + pydicom-data) with resunet and SimpleITK.

Prints a Markdown table (file, transfer syntax, resunet outcome, SimpleITK comparison) used in
docs/io.md. Each file is read on its own with ``load_study(file)``; the dicomdirtests folder is read
as a folder too. Run: ``.venv/bin/python bench/io_pydicom_data.py > /tmp/table.md`` (~1 min).
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import pydicom
import SimpleITK as sitk
from pydicom.data import get_testdata_file, get_testdata_files

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from io_helpers import compare_with_sitk, sitk_read  # noqa: E402

from resunet.errors import ResunetError  # noqa: E402
from resunet.io.dicom import read_series  # noqa: E402
from resunet.io.loader import list_series, load_study  # noqa: E402

logging.disable(logging.WARNING)
warnings.simplefilter("ignore")


def outcome(path: str) -> tuple[str, str, str]:
    try:
        ts = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta.get("TransferSyntaxUID")
        ts = ts.name if ts else "(no meta)"
    except Exception:
        ts = "?"
    try:
        vol = load_study(path)
    except ResunetError as err:
        return ts, f"refused: {type(err).__name__}: {err}".replace(path, Path(path).name).replace("|", "/"), ""
    got = f"read {vol.shape} {vol.array.dtype}"
    try:
        img = sitk_read(path)
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        scale = float(ds.get("DoseGridScaling", 1.0) or 1.0) if ds.get("Modality") == "RTDOSE" else 1.0
        lossy = "lossy" in ts.lower() or "baseline" in ts.lower() or "extended" in ts.lower() or "J2KI" in path
        same, dist, note = compare_with_sitk(vol, img, scale=scale, max_abs_diff=1.0 if lossy else 0.0)
        cmp = f"voxels {'equal' if same else 'DIFFER'}, corners {dist:.2g} mm" + (f" ({note})" if note else "")
    except Exception as err:
        cmp = f"SimpleITK cannot read it ({type(err).__name__})"
    return ts, got, cmp


def main() -> None:
    files = sorted({f for f in get_testdata_files("*.dcm")}, key=lambda f: Path(f).name.lower())
    print("| file | transfer syntax | resunet | SimpleITK comparison |")
    print("|---|---|---|---|")
    for f in files:
        if "dicomdirtests" in f:
            continue
        ts, got, cmp = outcome(f)
        print(f"| {Path(f).name} | {ts} | {got} | {cmp} |")
    folder = Path(get_testdata_file("DICOMDIR")).parent
    print()
    print(f"dicomdirtests folder ({len(list_series(folder))} image series found by list_series):")
    print()
    print("| series (last digits) | description | slices | resunet | SimpleITK ImageSeriesReader |")
    print("|---|---|---|---|---|")
    for info in list_series(folder):
        try:
            vol = read_series(info)
        except ResunetError as err:
            msg = str(err).split(": ", 1)[-1].replace("|", "/")
            print(f"| ...{info.uid[-14:]} | {info.description} | {info.n_slices} | refused: {msg} | |")
            continue
        parents = {str(Path(f).parent) for f in info.files}
        if "#" in info.uid or len(parents) > 1:
            files = info.files
        else:
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(parents.pop(), info.uid)
        same, dist, note = compare_with_sitk(vol, sitk_read(list(files)))
        cmp = f"voxels {'equal' if same else 'DIFFER'}, corners {dist:.2g} mm" + (f" ({note})" if note else "")
        print(f"| ...{info.uid[-14:]} | {info.description} | {info.n_slices} | read {vol.shape} | {cmp} |")

if __name__ == "__main__":
    main()
