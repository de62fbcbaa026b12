"""The installed package is the product (issue 18 point 1): a wheel, installed outside the checkout, runs.

Builds the wheel from a copy of the sources (``pip wheel --no-deps --no-build-isolation``, so nothing
is written into the checkout and nothing is downloaded), installs it with ``pip --python`` into a
fresh venv under a temp folder, and only then gives that venv the shared environment's dependencies
through a ``.pth`` path line (torch, monai, streamlit ... are not reinstalled). A path line in a
``.pth`` does not process the ``.pth`` files of the folder it adds, so the shared environment's
editable install of resunet stays inactive: the test asserts ``resunet.__file__`` lies inside the
temp venv. Every command then runs from an empty temp working directory, with no PYTHONPATH and a temp
HOME: ``resunet info --list``, ``resunet predict`` on the bundled model and bundled example study,
``resunet serve`` (health route) and ``resunet app`` (Streamlit's health endpoint, the page HTML, and
the installed page script run once with Streamlit's AppTest).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from test_app_support import REPO, free_port, stop, wait_http

pytestmark = pytest.mark.slow

#: generous: the shared 2-core machine can be slow to import torch in a fresh process
TIMEOUT_S = 300


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HOME=str(home), PYTHONNOUSERSITE="1", PYTHONUNBUFFERED="1",
               RESUNET_AUDIT_DB=str(home / "audit.sqlite"), RESUNET_APP_TEMP_DIR=str(home / "app-sessions"))
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A temp venv with the wheel installed; returns its paths and a clean environment."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "resunet", src / "resunet", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = root / "dist"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "--no-index", "-q", "-w", str(dist), str(src)],
                         capture_output=True, text=True, timeout=TIMEOUT_S, cwd=root)
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = dist.glob("resunet-*.whl")

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=TIMEOUT_S)
    python = venv / "bin" / "python"
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                          "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=TIMEOUT_S, cwd=root)
    assert res.returncode == 0, res.stdout + res.stderr
    # after the install (so pip never sees the shared editable resunet): the dependencies, as a path line
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    shared = [p for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
              if Path(p).is_dir()]
    (purelib / "_resunet_test_shared_deps.pth").write_text("".join(f"{p}\n" for p in sorted(shared)))

    home = root / "home"
    run_dir = root / "cwd"  # no checkout here or above it
    home.mkdir()
    run_dir.mkdir()
    return {"venv": venv, "python": python, "resunet": venv / "bin" / "resunet", "purelib": purelib,
            "cwd": run_dir, "env": _clean_env(home), "root": root}


def _run(inst: dict, *args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([*map(str, args)], cwd=inst["cwd"], env=inst["env"], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_wheel_carries_the_web_ui_the_models_and_the_example(installed):
    res = _run(installed, installed["python"], "-c",
               "import json, resunet, resunet.package_data as d, resunet.webui;"
               "print(json.dumps({'resunet': resunet.__file__, 'webui': resunet.webui.__file__,"
               " 'models': str(d.MODEL_DIR), 'example': str(d.EXAMPLE_T1)}))")
    assert res.returncode == 0, res.stderr
    where = json.loads(res.stdout)
    venv = installed["venv"].resolve()
    for key in ("resunet", "webui", "models", "example"):
        assert Path(where[key]).resolve().is_relative_to(venv), f"{key} from {where[key]}, not the wheel in {venv}"
    pkg = installed["purelib"] / "resunet"
    for rel in ("webui/streamlit_app.py", "webui/streamlit_config.toml", "webui/canvas_frontend/index.html",
                "data/model/brain_extraction.pt",
                "data/model/brain_tissue.pt", "data/model/MODEL_CARD.md", "data/example/colin27_t1.nii.gz",
                "data/example/LICENSE-mricron.txt", "data/example/colin27_t1_dicom/IM00001.dcm"):
        assert (pkg / rel).is_file(), f"the wheel lacks resunet/{rel}"
    assert len(list((pkg / "data/example/colin27_t1_dicom").glob("*.dcm"))) == 91
    assert not list(pkg.rglob("reproduce*.py")) and not list(pkg.rglob("make_example.py")), "scripts are not shipped"


def test_info_list_names_the_bundled_models(installed):
    res = _run(installed, installed["resunet"], "info", "--list")
    assert res.returncode == 0, res.stdout + res.stderr
    venv = installed["venv"].resolve()
    for name in ("brain_extraction", "brain_tissue"):
        (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith(name)]
        file = Path(line.rsplit("(", 1)[1].rstrip(")"))  # "name  labels ...  (/path/name.pt)"
        assert file.is_file() and file.resolve().is_relative_to(venv), line


def test_predict_on_the_bundled_model_and_example_study(installed):
    inst = installed
    example = Path(_run(inst, inst["python"], "-c",
                        "from resunet.package_data import EXAMPLE_T1; print(EXAMPLE_T1)").stdout.strip())
    assert example.is_file() and example.resolve().is_relative_to(inst["venv"].resolve())
    out = inst["cwd"] / "masks"
    res = _run(inst, inst["resunet"], "predict", example, "--out", out, "--no-tta", "--device", "cpu",
               "--no-progress", "--no-audit")
    assert res.returncode == 0, res.stdout + res.stderr
    mask_img = nib.load(out / "colin27_t1.nii.gz")
    src_img = nib.load(example)
    mask = np.asarray(mask_img.dataobj)
    assert mask.shape == src_img.shape == (91, 109, 91)
    assert np.allclose(mask_img.affine, src_img.affine)
    ref = np.asarray(nib.load(example.parent / "colin27_brainmask.nii.gz").dataobj) > 0
    pred = mask > 0
    dice = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
    assert pred.any() and dice > 0.9, f"Dice {dice:.3f} against the example's brain mask"
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["cases"][0]["status"] == "ok"
    assert summary["model"]["name"].startswith("brain_extraction") or "brain_extraction" in json.dumps(summary["model"])


def test_serve_answers_its_health_route(installed):
    inst = installed
    port = free_port()
    log = inst["root"] / "serve.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([str(inst["resunet"]), "serve", "--port", str(port), "--state-dir",
                                 str(inst["root"] / "serve-state"), "--no-audit"], cwd=inst["cwd"], env=inst["env"],
                                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT)
        try:
            body = wait_http(f"http://127.0.0.1:{port}/healthz", TIMEOUT_S, proc)
        except (RuntimeError, TimeoutError) as err:
            body = str(err).encode()
        finally:
            stop(proc)
    assert b"ok" in body.lower(), body.decode(errors="replace") + log.read_text(errors="replace")[-3000:]


def test_app_starts_headless_and_its_page_loads(installed):
    inst = installed
    port = free_port()
    log = inst["root"] / "app.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([str(inst["resunet"]), "app", "--port", str(port), "--headless"], cwd=inst["cwd"],
                                env=inst["env"], stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT)
        try:
            health = wait_http(f"http://127.0.0.1:{port}/_stcore/health", TIMEOUT_S, proc)
            page = wait_http(f"http://127.0.0.1:{port}/", 60, proc)
        except (RuntimeError, TimeoutError) as err:
            health, page = str(err).encode(), b""
        finally:
            stop(proc)
    text = log.read_text(errors="replace")
    assert health == b"ok", text[-3000:]
    assert b"<html" in page.lower() and b"streamlit" in page.lower()
    # the installed page script itself runs (imports resunet.webui from the wheel, finds the bundled model)
    code = (
        "import tomllib\n"
        "from streamlit import config\n"
        "from streamlit.testing.v1 import AppTest\n"
        "from resunet.cli.app_cmd import app_script\n"
        "for k, v in tomllib.loads((app_script().parent / 'streamlit_config.toml').read_text()).items():\n"
        "    for kk, vv in v.items():\n"
        "        config.set_option(f'{k}.{kk}', vv)  # what resunet app passes on Streamlit's command line\n"
        "at = AppTest.from_file(str(app_script()), default_timeout=240).run()\n"
        "assert not at.exception, [e.value for e in at.exception]\n"
        "text = ' '.join(str(m.value) for m in [*at.markdown, *at.title, *at.caption, *at.info, *at.warning])\n"
        "print(app_script()); print(text)\n"
    )
    res = _run(inst, inst["python"], "-c", code)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    script = Path(res.stdout.splitlines()[0])
    assert script.resolve().is_relative_to(inst["venv"].resolve())
    assert "brain" in res.stdout.lower()
