"""Start-up of the ``resunet`` command measured by what it imports, not by wall time (issue 23 point 3).

Building a subcommand's parser (what ``resunet SUBCOMMAND --help`` and the start of every command do)
must not import the heavy libraries: each one is imported where it is used. Checked in a fresh
interpreter per subcommand, from ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_app_support import REPO

HEAVY = ("numpy", "scipy", "pydicom", "nibabel", "torch", "monai", "highdicom", "pynetdicom", "streamlit",
         "fastapi", "uvicorn", "matplotlib", "skimage", "SimpleITK")

CODE = """
import json, sys
before = set(sys.modules)
from resunet.cli import build_parser
build_parser({name!r})
tops = {{m.split(".")[0] for m in set(sys.modules) - before}}
print(json.dumps({{"count": len(set(sys.modules) - before), "heavy": sorted(tops & set({heavy!r}))}}))
"""


def _imports(name: str | None) -> dict:
    r = subprocess.run([sys.executable, "-c", CODE.format(name=name, heavy=HEAVY)], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [None, "convert", "train", "corrections", "predict", "export", "info", "evaluate", "audit", "app", "serve"])
def test_building_the_parser_imports_no_heavy_library(name):
    got = _imports(name)
    assert got["heavy"] == [], got
    assert got["count"] < 200, got  # ~90 modules (argparse, resunet's own); the eager io package was ~560


def test_resunet_io_names_still_import_on_use():
    code = ("import sys; import resunet.io.limits; assert 'pydicom' not in sys.modules; "
            "from resunet.io import load_study, Volume, write_nifti; import resunet.io as rio; "
            "assert load_study.__module__ == 'resunet.io.loader' and 'load_study' in dir(rio); "
            "assert 'nibabel' in sys.modules; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    with pytest.raises(ImportError, match="cannot import name 'nope'"):
        exec("from resunet.io import nope")  # noqa: S102 - the module's __getattr__ refuses unknown names
