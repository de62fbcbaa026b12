"""Hardening (issue 13): per-case limits checked from headers, inputs checked before the model loads,
real messages for absurd sizes and spacings, NaN label maps, no anonymous access off loopback, named
users with rate-limited logins, stale temp files of killed runs."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from resunet.cli import main
from resunet.errors import InputError
from resunet.io import Volume
from resunet.io.limits import Limits
from resunet.io.nifti import write_mask_nifti, write_nifti
from test_inference_support import single_torch_thread  # noqa: F401  (autouse fixture)
from test_inference_support import make_checkpoint, synthetic_scan

REPO = Path(__file__).resolve().parents[1]


def header_only_nifti_gz(path: Path, shape: tuple[int, ...], dtype=np.uint8, zooms=(1.0, 1.0, 1.0)) -> Path:
    """A .nii.gz holding a real NIfTI-1 header (nibabel) and no voxel data at all: if anything tried to
    decompress the voxels it would fail with a truncation error instead of the limit's message."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_zooms(tuple(zooms) + (1.0,) * (len(shape) - 3))
    hdr.set_sform(np.diag(list(zooms) + [1.0]), code=1)
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0\0\0\0"))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    scan = synthetic_scan()
    return {"ckpt": make_checkpoint(root / "tiny.pt", scan), "scan": scan, "root": root}


@pytest.fixture(autouse=True)
def audit_db(tmp_path, monkeypatch):
    monkeypatch.setenv("RESUNET_AUDIT_DB", str(tmp_path / "audit.sqlite"))
    monkeypatch.delenv("RESUNET_MAX_MEMORY_GB", raising=False)


# -- 1. limits from the header ---------------------------------------------------------------------


def test_decompression_bomb_header_is_refused_by_convert_before_reading(tmp_path, capsys):
    bomb = header_only_nifti_gz(tmp_path / "gzbomb.nii.gz", (1100, 1100, 1100))
    assert main(["convert", str(bomb), str(tmp_path / "out.nii.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1100x1100x1100" in err and "--max-memory-gb" in err, err
    assert "16 GB" in err and "RESUNET_MAX_MEMORY_GB" in err
    # the flag raises the limit: then the (missing) voxel data are what fails, so the limit was checked first
    assert main(["convert", str(bomb), str(tmp_path / "out.nii.gz"), "--max-memory-gb", "200"]) == 2
    err = capsys.readouterr().err
    assert "--max-memory-gb" not in err and "cannot be read" in err
    assert not list(tmp_path.glob("*out*"))


def test_limit_from_the_environment_and_bad_values(tmp_path, monkeypatch, capsys):
    scan = synthetic_scan()
    write_nifti(scan, tmp_path / "scan.nii.gz")
    assert Limits.from_env({"RESUNET_MAX_MEMORY_GB": "2.5"}).max_memory_gb == 2.5
    monkeypatch.setenv("RESUNET_MAX_MEMORY_GB", "1.0")  # the fixed 1 GiB base alone is above 1.0 GB
    assert main(["convert", str(tmp_path / "scan.nii.gz"), str(tmp_path / "o.nii.gz")]) == 2
    assert "above the limit of 1 GB" in capsys.readouterr().err
    monkeypatch.setenv("RESUNET_MAX_MEMORY_GB", "lots")
    assert main(["convert", str(tmp_path / "scan.nii.gz"), str(tmp_path / "o.nii.gz")]) == 2
    assert "RESUNET_MAX_MEMORY_GB='lots' is not a number" in capsys.readouterr().err


def test_default_limit_admits_a_512x512x2000_ct_and_refuses_the_1100_cubed_bomb():
    lim = Limits()
    lim.check_size("ct", (512, 512, 2000), 2)
    with pytest.raises(InputError, match="1100x1100x1100"):
        lim.check_size("bomb", (1100, 1100, 1100), 1)
    assert lim.estimate_bytes(512 * 512 * 2000, 2) < 0.6 * 24 * 2**30


def test_dicom_series_is_refused_from_its_headers(tmp_path, capsys):
    from resunet.io.dicom_writer import write_dicom_series

    scan = synthetic_scan()
    write_dicom_series(scan, tmp_path / "dicom", modality="MR")
    from resunet.io.limits import series_shape
    from resunet.io.loader import list_series

    info = list_series(tmp_path / "dicom")[0]
    assert series_shape(info) == scan.shape
    # a limit just under this series' estimate refuses it, naming the series size
    need = Limits().estimate_bytes(int(np.prod(scan.shape)), 2)
    gb = (need - 1) / 2**30
    assert main(["convert", str(tmp_path / "dicom"), str(tmp_path / "o.nii.gz"), "--max-memory-gb", repr(gb)]) == 2
    err = capsys.readouterr().err
    assert "x".join(map(str, scan.shape)) in err and "--max-memory-gb" in err
    assert main(["convert", str(tmp_path / "dicom"), str(tmp_path / "o.nii.gz"), "--max-memory-gb", repr(gb + 0.01)]) == 0


def test_stale_part_files_of_a_killed_run_are_removed_on_start(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    inputs = tmp_path / "in"
    write_nifti(model["scan"], inputs / "caseA.nii.gz")
    write_nifti(model["scan"], inputs / "caseB.nii.gz")
    stale_a = out / ".caseA.k2j3h4.part.nii.gz"
    stale_b = out / ".caseB.x9y8z7.part.nii.gz"
    for f in (stale_a, stale_b):
        f.write_bytes(b"half a file")
    # shard 0 of 2 takes caseA only: it removes caseA's temp, never another shard's
    assert main(["predict", str(inputs), "--out", str(out), "--model", str(model["ckpt"]), "--shard", "0/2",
                 "--no-tta", "--no-progress", "--no-audit"]) == 0
    assert not stale_a.exists() and stale_b.exists()
    # convert removes temps of its own output name
    conv = tmp_path / "conv"
    conv.mkdir()
    (conv / ".scan.abc123.part.nii.gz").write_bytes(b"x")
    (conv / ".other.abc123.part.nii.gz").write_bytes(b"x")
    assert main(["convert", str(inputs / "caseA.nii.gz"), str(conv / "scan.nii.gz")]) == 0
    assert sorted(p.name for p in conv.iterdir()) == [".other.abc123.part.nii.gz", "scan.nii.gz"]


def test_sigterm_while_writing_leaves_no_part_file(tmp_path):
    rng = np.random.default_rng(0)
    big = Volume(array=rng.random((200, 200, 200), dtype=np.float32), affine=np.eye(4), meta={"source": "t"})
    write_nifti(big, tmp_path / "big.nii")
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "resunet", "convert", str(tmp_path / "big.nii"),
                             str(out / "big.nii.gz")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not list(out.glob(".big.*.part*")):
        time.sleep(0.005)
    assert proc.poll() is None, "convert finished before its temp file was seen; use a larger input"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert list(out.iterdir()) == []  # neither a temp file nor a half-written output


# -- 2. every input checked before the model loads ----------------------------------------------------


def test_bad_inputs_are_all_reported_before_the_model_loads(model, tmp_path, capsys):
    inputs = tmp_path / "in"
    write_nifti(model["scan"], inputs / "good1.nii.gz")
    write_nifti(model["scan"], inputs / "good2.nii.gz")
    header_only_nifti_gz(inputs / "bomb.nii.gz", (1100, 1100, 1100))
    good = (inputs / "good1.nii.gz").read_bytes()
    (inputs / "cut.nii.gz").write_bytes(good[:200])  # header cut short
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), str(inputs / "fourd.nii.gz"))
    broken_model = tmp_path / "broken.pt"
    broken_model.write_bytes(b"not a checkpoint")
    argv = ["predict", str(inputs), "--out", str(tmp_path / "o"), "--no-progress", "--no-audit", "--no-tta"]
    # with a model that cannot load, the three refusals still come first (the headers were read before it)
    assert main([*argv, "--model", str(broken_model)]) == 2
    err = capsys.readouterr().err.splitlines()
    refused = [ln for ln in err if "refused:" in ln]
    assert [ln.split()[3] for ln in refused] == ["bomb", "cut", "fourd"], err
    assert "--max-memory-gb" in refused[0] and "4D with 3 volumes" in refused[2]
    assert "3 of 5 input(s) refused" in "\n".join(err)
    assert err.index(refused[-1]) < len(err) - 1 and "broken.pt" in err[-1]
    # with the real model: the two good cases are segmented, the three refused recorded as failed
    assert main([*argv, "--model", str(model["ckpt"])]) == 1
    doc = json.loads((tmp_path / "o" / "predictions.json").read_text())
    status = {r["case"]: r["status"] for r in doc["cases"]}
    assert status == {"good1": "ok", "good2": "ok", "bomb": "failed", "cut": "failed", "fourd": "failed"}


def test_all_inputs_refused_means_the_model_is_never_loaded(model, tmp_path, capsys):
    bomb = header_only_nifti_gz(tmp_path / "gzbomb.nii.gz", (1100, 1100, 1100))
    broken_model = tmp_path / "broken.pt"
    broken_model.write_bytes(b"not a checkpoint")
    code = main(["predict", str(bomb), "--out", str(tmp_path / "o"), "--model", str(broken_model), "--no-progress",
                 "--no-audit"])
    assert code == 2
    err = capsys.readouterr().err
    assert "broken.pt" not in err.replace(str(tmp_path / "o" / "predictions.json"), "")
    assert "the model was not loaded" in err and "Traceback" not in err
    doc = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert doc["cases"][0]["status"] == "failed" and "--max-memory-gb" in doc["cases"][0]["reason"]
    assert doc["model"]["loaded"] is False


# -- 3. absurd sizes and spacings -------------------------------------------------------------------


def test_one_voxel_volume_and_huge_spacing_get_real_messages(model, tmp_path, capsys):
    inputs = tmp_path / "in"
    one = Volume(array=np.ones((1, 1, 1), np.int16), affine=np.eye(4), meta={})
    write_nifti(one, inputs / "one.nii.gz")
    scan = model["scan"]
    write_nifti(Volume(array=scan.array, affine=np.diag([1e6, 1e6, 1e6, 1.0]), meta={}), inputs / "huge.nii.gz")
    code = main(["predict", str(inputs), "--out", str(tmp_path / "o"), "--model", str(model["ckpt"]), "--no-progress",
                 "--no-audit"])
    assert code == 2
    doc = json.loads((tmp_path / "o" / "predictions.json").read_text())
    reasons = {r["case"]: r["reason"] for r in doc["cases"]}
    assert "1x1x1 voxels" in reasons["one"] and "at least 4 voxels along two axes" in reasons["one"]
    assert "1e+06 x 1e+06 x 1e+06 mm" in reasons["huge"] and "0.001 to 1000 mm" in reasons["huge"]
    assert not any("internal error" in r for r in reasons.values())


def test_predictor_refuses_grids_too_small_or_too_large_for_the_model(model):
    from resunet.inference import Predictor

    pred = Predictor(model["ckpt"], tta=False)  # works at 1.5 mm
    tiny = Volume(array=np.ones((6, 6, 6), np.float32), affine=np.diag([0.1, 0.1, 0.1, 1.0]), meta={"source": "tiny"})
    with pytest.raises(InputError, match=r"tiny: the scan \(6x6x6 voxels of 0.1 x 0.1 x 0.1 mm\) is 1x1x1 voxels"):
        pred.predict(tiny)
    wide = Volume(array=np.ones((64, 64, 64), np.float32), affine=np.diag([900.0] * 3 + [1.0]), meta={"source": "wide"})
    with pytest.raises(InputError, match="becomes 38400x38400x38400 voxels") as err:
        pred.predict(wide)
    assert "--max-memory-gb" in str(err.value)


# -- 4. NaN in a label map ----------------------------------------------------------------------------


def test_evaluate_refuses_nan_labels_naming_the_file_and_count(tmp_path, capsys):
    arr = np.zeros((10, 10, 10), np.float32)
    arr[2:6, 2:6, 2:6] = 1
    ref = Volume(array=arr, affine=np.eye(4), meta={"is_label": True})
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    write_mask_nifti(ref, tmp_path / "gt" / "c1.nii.gz")
    bad = arr.copy()
    bad[0, 0, :7] = np.nan
    nib.save(nib.Nifti1Image(bad, np.eye(4)), str(tmp_path / "pred" / "c1.nii.gz"))
    code = main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--out",
                 str(tmp_path / "rep"), "--workers", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "c1.nii.gz" in err and "7 voxels are NaN" in err and len(err.strip().splitlines()) == 1, err


def test_evaluate_refuses_negative_labels_naming_the_file_and_count(tmp_path, capsys):
    """A label 200 written as int8 wraps to -56: refused, not scored as a label of its own."""
    arr = np.zeros((10, 10, 10), np.int8)
    arr[2:6, 2:6, 2:6] = 1
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / "gt" / "c1.nii.gz"))
    bad = arr.copy()
    bad[7, 7, :5] = np.array(200, np.uint8).view(np.int8)
    nib.save(nib.Nifti1Image(bad, np.eye(4)), str(tmp_path / "pred" / "c1.nii.gz"))
    code = main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--out",
                 str(tmp_path / "rep"), "--workers", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "c1.nii.gz" in err and "5 voxels hold negative values (lowest -56" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "rep" / "metrics.csv").exists(), err


# -- 5. no anonymous access off loopback ----------------------------------------------------------------


def test_loopback_addresses():
    from resunet.netaddr import is_loopback_address

    assert all(is_loopback_address(a) for a in ("127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost"))
    assert not any(is_loopback_address(a) for a in ("0.0.0.0", "::", "", "10.1.2.3", "192.168.1.4", "no.such.host."))


def test_app_on_a_network_address_without_login_refuses_to_start(tmp_path):
    from test_app_support import free_port

    env = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=str(REPO))
    port = str(free_port())
    res = subprocess.run([sys.executable, "-m", "resunet", "app", "--address", "0.0.0.0", "--port", port, "--headless"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert res.returncode == 2, res.stderr
    assert "no login is configured" in res.stderr and "--allow-anonymous" in res.stderr and "--add-user" in res.stderr


def test_allow_anonymous_and_named_users_lift_the_refusal(tmp_path, monkeypatch):
    from resunet.cli import build_parser
    from resunet.cli.app_cmd import check_exposure

    monkeypatch.setenv("HOME", str(tmp_path))
    parser = build_parser("app")
    args = parser.parse_args(["app", "--address", "0.0.0.0"])
    with pytest.raises(Exception, match="no login is configured"):
        check_exposure(args)
    assert check_exposure(parser.parse_args(["app", "--address", "127.0.0.1"])) is None
    warning = check_exposure(parser.parse_args(["app", "--address", "0.0.0.0", "--allow-anonymous"]))
    assert "WITHOUT A LOGIN" in warning
    res = subprocess.run([sys.executable, "-m", "resunet", "app", "--add-user", "alice", "--secrets",
                          str(tmp_path / ".streamlit" / "secrets.toml")], input="pw-alice\n", text=True,
                         capture_output=True, env=dict(os.environ, HOME=str(tmp_path), PYTHONPATH=str(REPO)), cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert check_exposure(args) is None  # ~/.streamlit/secrets.toml now has a user


# -- 6. named users ----------------------------------------------------------------------------------


def test_add_user_keeps_the_rest_of_the_secrets_file(tmp_path):
    import tomllib

    from resunet.webui.auth import add_user, password_users, verify_password

    secrets = tmp_path / "secrets.toml"
    secrets.write_text('# site secrets\n[auth]\nclient_id = "x"  # keep me\n\n[resunet]\npassword_hash = "old"\n')
    add_user(secrets, "alice", "pw-a")
    add_user(secrets, "bob@example.org", "pw-b")
    add_user(secrets, "alice", "pw-a2")  # a new password replaces the old line
    text = secrets.read_text()
    assert text.startswith('# site secrets\n[auth]\nclient_id = "x"  # keep me\n\n[resunet]\npassword_hash = "old"\n')
    assert text.count('"alice" =') == 1 and oct(secrets.stat().st_mode & 0o777) == "0o600"
    users = password_users(tomllib.loads(text))
    assert set(users) == {"alice", "bob@example.org", "password login"}
    assert verify_password("pw-a2", users["alice"]) and not verify_password("pw-a", users["alice"])
    with pytest.raises(Exception, match="user name"):
        add_user(secrets, "bad name", "x")


def test_failed_logins_are_rate_limited_per_user_and_per_client():
    from resunet.webui.auth import LoginThrottle, check_login, hash_password

    now = [1000.0]
    throttle = LoginThrottle(free_failures=3, base_delay_s=10, max_delay_s=60, clock=lambda: now[0])
    users = {"alice": hash_password("right", iterations=1000), "bob": hash_password("b", iterations=1000)}
    for _ in range(3):
        assert check_login(users, "alice", "wrong", "10.0.0.1", throttle) == (False, "Wrong user name or password.")
    ok, msg = check_login(users, "alice", "right", "10.0.0.9", throttle)  # right password, but alice must wait
    assert not ok and msg.startswith("Too many failed logins. Try again in 11 s")
    ok, msg = check_login(users, "bob", "b", "10.0.0.1", throttle)  # the client that failed must wait too
    assert not ok and "Too many failed logins" in msg
    assert check_login(users, "bob", "b", "10.0.0.2", throttle) == (True, "")  # others are not affected
    now[0] += 10.5
    assert check_login(users, "alice", "wrong", "10.0.0.3", throttle)[0] is False  # 4th failure: wait doubles
    now[0] += 15
    assert "Try again in 6 s" in check_login(users, "alice", "right", "10.0.0.3", throttle)[1]
    now[0] += 6
    assert check_login(users, "alice", "right", "10.0.0.3", throttle) == (True, "")
    assert throttle.failures("user:alice") == 0


def test_named_user_signs_in_and_is_recorded_in_the_audit_log(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from resunet.webui.auth import THROTTLE, hash_password
    from resunet.reports.audit import read_runs
    from test_app_support import APP_SCRIPT, make_tiny_model

    THROTTLE._state.clear()
    make_tiny_model(tmp_path / "models" / "tiny.pt")
    monkeypatch.setenv("RESUNET_APP_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("RESUNET_APP_DEFAULT_MODEL", "tiny.pt")
    monkeypatch.setenv("RESUNET_APP_TEMP_DIR", str(tmp_path / "sessions"))
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=180)
    at.secrets["resunet"] = {"users": {"alice": hash_password("pw-a", iterations=1000),
                                       "bob": hash_password("pw-b", iterations=1000)}}
    at.run()
    assert [t.label for t in at.text_input] == ["User name", "Password"]
    at.text_input[0].input("alice")
    at.text_input[1].input("pw-b")  # bob's password is not alice's
    at.button[0].click().run()
    assert [e.value for e in at.error] == ["Wrong user name or password."] and not at.file_uploader
    at.text_input[1].input("pw-a")
    at.button[0].click().run()
    assert not at.exception and at.file_uploader(key="upload") is not None
    assert "Signed in as alice" in [c.value for c in at.sidebar.caption]
    at.button(key="example").click().run()
    assert not at.exception
    (run,) = read_runs(tmp_path / "audit.sqlite")
    assert run["user"] == "alice" and json.loads(run["provenance_json"])["web_user"] == "alice"
    THROTTLE._state.clear()


def test_page_started_with_streamlit_run_on_a_network_address_refuses_without_a_login(monkeypatch):
    """`streamlit run resunet/webui/streamlit_app.py --server.address 0.0.0.0` skips `resunet app`'s check: the
    page refuses by itself (the real page, its real config option), and opens with --allow-anonymous."""
    from streamlit import config
    from streamlit.testing.v1 import AppTest

    from resunet.webui.auth import ENV_ALLOW_ANONYMOUS
    from test_app_support import APP_SCRIPT

    monkeypatch.delenv(ENV_ALLOW_ANONYMOUS, raising=False)
    old = config.get_option("server.address")
    try:
        for address in ("0.0.0.0", ""):
            config.set_option("server.address", address)
            at = AppTest.from_file(str(APP_SCRIPT), default_timeout=120).run()
            assert not at.exception
            assert len(at.error) == 1 and "no login is configured" in at.error[0].value, address
            assert ("every network interface" in at.error[0].value) == (address == ""), at.error[0].value
            assert not at.file_uploader and not at.button  # nothing of the page behind it
        monkeypatch.setenv(ENV_ALLOW_ANONYMOUS, "1")  # what `resunet app --allow-anonymous` sets
        at = AppTest.from_file(str(APP_SCRIPT), default_timeout=120).run()
        assert not at.exception and not any("no login is configured" in e.value for e in at.error)
        assert at.file_uploader or at.button
    finally:
        config.set_option("server.address", old)
