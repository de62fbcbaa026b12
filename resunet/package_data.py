"""The files shipped inside the installed package: the bundled models and the example study.

They live under ``resunet/data/`` (package data in the wheel), so an install without a checkout
beside it (``pip install resunet-*.whl``) carries them; the scripts that made them stay in the
repository's top-level ``data/`` (see ``data/README.md``).

``MODEL_DIR``: the bundled checkpoints ``<name>.pt`` with their model cards (``MODEL_CARD*.md``) and
held-out metrics. ``EXAMPLE_DIR``: the Colin27 example study (NIfTI T1, brain mask, DICOM series).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

# importlib.resources names the folder inside the installed package; Path() because the package is
# always installed as files (setuptools' wheel, editable or not), never imported from a zip.
DATA_DIR = Path(str(files("resunet") / "data"))
#: the bundled checkpoints, model cards and metrics
MODEL_DIR = DATA_DIR / "model"
#: the bundled example study
EXAMPLE_DIR = DATA_DIR / "example"
#: the example T1 (NIfTI), its reference brain mask, the same T1 as a DICOM series
EXAMPLE_T1 = EXAMPLE_DIR / "colin27_t1.nii.gz"
EXAMPLE_BRAINMASK = EXAMPLE_DIR / "colin27_brainmask.nii.gz"
EXAMPLE_DICOM = EXAMPLE_DIR / "colin27_t1_dicom"
