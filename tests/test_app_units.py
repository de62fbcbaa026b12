"""Web UI building blocks: display orientation/aspect/window/overlay, login, session folders, config, `resunet app`."""

from __future__ import annotations

import os
import time

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as nio
from streamlit.testing.v1 import AppTest

from test_app_support import APP_SCRIPT

from resunet.webui import viewer
from resunet.webui.auth import hash_password, login_mode, verify_password
from resunet.webui.config import AppConfig
from resunet.webui.workspace import SessionWorkspace, sweep_expired
from resunet.cli import main as cli_main
from resunet.errors import ConfigError
from resunet.io.volume import Volume


# -- viewer ----------------------------------------------------------------------------------------


def _ras_volume(shape=(20, 16, 12), spacing=(1.0, 1.5, 3.0)) -> Volume:
    """A RAS volume whose voxels are all different, with a corner marker at the patient's right-anterior-superior."""
    arr = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = (-10.0, 5.0, 2.0)
    return Volume(arr, aff)


def _reoriented(vol: Volume, codes: str) -> Volume:
    """The same physical image stored with voxel axes ``codes`` (e.g. 'LPS', 'SAL'), via nibabel."""
    img = nib.Nifti1Image(vol.array, vol.affine)
    target = nio.axcodes2ornt(tuple(codes))
    ornt = nio.ornt_transform(nio.io_orientation(vol.affine), target)
    out = img.as_reoriented(ornt)
    return Volume(np.asarray(out.dataobj), out.affine)


def test_radiological_convention_right_on_screen_left_anterior_and_superior_up():
    vol = _ras_volume()
    d = viewer.to_display(vol)
    x, y, z = (s - 1 for s in vol.shape)  # the voxel furthest right, anterior, superior
    for view, index in (("axial", z), ("coronal", y)):
        img = d.slice2d(view, index)
        # top-left pixel = patient right (+x) and anterior (axial) / superior (coronal)
        assert img[0, 0] == vol.array[x, y, z]
    sag = d.slice2d("sagittal", x)
    assert sag[0, 0] == vol.array[x, y, z]  # anterior on the left, superior at the top
    assert viewer.VIEW_LABELS["axial"] == ("R", "L", "A", "P")
    assert viewer.VIEW_LABELS["coronal"] == ("R", "L", "S", "I")
    assert viewer.VIEW_LABELS["sagittal"] == ("A", "P", "S", "I")


@pytest.mark.parametrize("codes", ["LPS", "LAS", "SAL", "PIR"])
def test_any_storage_order_shows_the_same_screen_images(codes):
    vol = _ras_volume()
    ref = viewer.to_display(vol)
    other = viewer.to_display(_reoriented(vol, codes))
    assert other.spacing == pytest.approx(ref.spacing)
    for view in viewer.VIEWS:
        for i in (0, ref.n_slices(view) // 2):
            np.testing.assert_array_equal(other.slice2d(view, i), ref.slice2d(view, i))


def test_oblique_scan_is_shown_on_its_nearest_axes_and_flagged():
    a = np.radians(20.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([1.0, 1.5, 3.0])
    vol = Volume(np.arange(20 * 16 * 12, dtype=np.int32).reshape(20, 16, 12), aff)
    d = viewer.to_display(vol)
    assert d.oblique and not viewer.to_display(_ras_volume()).oblique
    assert d.spacing == pytest.approx((1.0, 1.5, 3.0))
    np.testing.assert_array_equal(d.slice2d("axial", 11), viewer.to_display(_ras_volume()).slice2d("axial", 11))


def test_physical_aspect_ratio_follows_the_spacing():
    d = viewer.to_display(_ras_volume(shape=(100, 80, 20), spacing=(0.5, 0.5, 3.0)))
    assert d.pixel_mm("axial") == (0.5, 0.5)
    assert d.pixel_mm("coronal") == (3.0, 0.5)  # rows are z (3 mm), columns x
    scale = 2.0
    img = viewer.render_slice(d, "coronal", 10, window=(100, 50), mm_to_px=scale, orientation_labels=False)
    assert img.size == (round(100 * 0.5 * scale), round(20 * 3.0 * scale))  # 50 mm wide, 60 mm high
    img = viewer.render_slice(d, "sagittal", 10, window=(100, 50), mm_to_px=scale, orientation_labels=False)
    assert img.size == (round(80 * 0.5 * scale), round(20 * 3.0 * scale))


def test_window_level_maps_the_window_edges_to_black_and_white():
    x = np.array([[-1000.0, 0.0, 40.0, 80.0, 1000.0]])
    out = viewer.apply_window(x, *viewer.WINDOW_PRESETS["CT brain"])  # W80 L40: 0..80 HU
    assert out.tolist() == [[0, 0, 127, 255, 255]]
    w, lvl = viewer.auto_window(np.r_[np.zeros(1000), np.linspace(10, 110, 10001)])
    assert lvl == pytest.approx(60.0, abs=0.5) and w == pytest.approx(99.0, abs=1.0)


def test_overlay_uses_the_label_colours_and_outlines():
    shape = (40, 40, 5)
    img = Volume(np.full(shape, 100, np.int16), np.eye(4))
    lab = np.zeros(shape, np.uint8)
    lab[5:15, 5:15, :] = 1
    lab[25:35, 25:35, :] = 2
    d, m = viewer.to_display(img), viewer.to_display(img.with_array(lab))
    grey = 127
    full = np.asarray(viewer.render_slice(d, "axial", 2, window=(200, 100), mask=m, opacity=1.0, outline=False,
                                          mm_to_px=1.0, orientation_labels=False))
    # label 1 occupies x 5..14 (screen columns 40-1-14..40-1-5 = 25..34), y 5..14 (rows 25..34)
    assert tuple(full[30, 30]) == viewer.label_colour(1)
    assert tuple(full[10, 10]) == viewer.label_colour(2)
    assert tuple(full[20, 20]) == (grey, grey, grey)
    ring = np.asarray(viewer.render_slice(d, "axial", 2, window=(200, 100), mask=m, opacity=0.0, outline=True,
                                          mm_to_px=1.0, orientation_labels=False))
    assert tuple(ring[25, 30]) == viewer.label_colour(1)  # boundary row of label 1
    assert tuple(ring[30, 30]) == (grey, grey, grey)  # inside: no fill at opacity 0


def test_uncertainty_overlay_tints_uncertain_voxels_only():
    shape = (20, 20, 3)
    img = Volume(np.zeros(shape, np.float32), np.eye(4))
    u = np.zeros(shape, np.float32)
    u[:10] = 1.0  # x < 10: patient's left half -> screen right half
    d, du = viewer.to_display(img), viewer.to_display(img.with_array(u))
    out = np.asarray(viewer.render_slice(d, "axial", 1, window=(10, 5), uncertainty=du, uncertainty_opacity=1.0,
                                         mm_to_px=1.0, orientation_labels=False))
    assert tuple(out[10, 15]) == viewer.UNCERTAINTY_COLOUR
    assert tuple(out[10, 4]) == (0, 0, 0)


# -- login -----------------------------------------------------------------------------------------


def test_password_hash_round_trip():
    stored = hash_password("correct horse", iterations=1000)
    assert stored.startswith("pbkdf2_sha256$1000$")
    assert verify_password("correct horse", stored)
    assert not verify_password("wrong", stored)
    assert not verify_password("correct horse", "garbage")
    assert not verify_password("correct horse", "md5$1$00$00")


def test_login_mode_from_secrets():
    assert login_mode({}) == "none"
    assert login_mode({"resunet": {"password_hash": "x"}}) == "password"
    assert login_mode({"auth": {"redirect_uri": "u", "cookie_secret": "s", "client_id": "c"}}) == "oidc"
    assert login_mode({"auth": {"redirect_uri": "u", "google": {"client_id": "c"}}}) == "oidc"


def test_password_login_guards_the_page(tmp_path, monkeypatch):
    monkeypatch.setenv("RESUNET_APP_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("RESUNET_APP_TEMP_DIR", str(tmp_path / "sessions"))
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=60)
    at.secrets["resunet"] = {"password_hash": hash_password("s3cret", iterations=1000)}
    at.run()
    assert not at.exception
    assert not at.file_uploader  # nothing of the page before login
    at.text_input[0].input("nope")
    at.button[0].click().run()
    assert [e.value for e in at.error] == ["Wrong password."]
    assert not at.file_uploader
    at.text_input[0].input("s3cret")
    at.button[0].click().run()
    assert not at.exception
    assert at.file_uploader(key="upload") is not None


def test_oidc_login_guards_the_page(tmp_path, monkeypatch):
    monkeypatch.setenv("RESUNET_APP_TEMP_DIR", str(tmp_path / "sessions"))
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=60)
    at.secrets["auth"] = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "x" * 32,
                          "client_id": "resunet", "client_secret": "s",
                          "server_metadata_url": "https://login.example.org/.well-known/openid-configuration"}
    at.run()
    assert not at.exception
    assert [b.label for b in at.button] == ["Log in"]
    assert not at.file_uploader


# -- session folders -------------------------------------------------------------------------------


def test_session_folder_is_private_and_deleted_with_the_session(tmp_path):
    ws = SessionWorkspace(tmp_path, ttl_s=60)
    path = ws.path
    assert path.is_dir() and (path.stat().st_mode & 0o777) == 0o700
    (ws.subdir("upload") / "scan.nii.gz").write_bytes(b"x")
    del ws  # what happens when Streamlit drops a closed session's state
    assert not path.exists()


def test_expired_session_folders_are_swept(tmp_path):
    old = SessionWorkspace(tmp_path, ttl_s=60)
    fresh = SessionWorkspace(tmp_path, ttl_s=60)
    past = time.time() - 3600
    os.utime(old.path / ".last-active", (past, past))
    removed = sweep_expired(tmp_path, ttl_s=60)
    assert removed == [old.path]
    assert not old.path.exists() and fresh.path.exists()
    assert old.expired()
    assert not fresh.expired() and fresh.expired(now=time.time() + 61)


# -- config and CLI ----------------------------------------------------------------------------------


def test_config_yaml_round_trip_env_and_errors(tmp_path):
    cfg = AppConfig(max_upload_mb=10, session_ttl_min=5, model_dir=tmp_path)
    assert AppConfig.from_yaml(cfg.to_yaml()) == cfg
    f = tmp_path / "app.yaml"
    f.write_text(cfg.to_yaml())
    env = AppConfig.from_env({"RESUNET_APP_CONFIG": str(f), "RESUNET_APP_MAX_UPLOAD_MB": "20"})
    assert env.max_upload_mb == 20 and env.session_ttl_min == 5 and env.model_dir == tmp_path
    assert AppConfig().default_model_path.name == "brain_extraction.pt"
    with pytest.raises(ConfigError, match="max_upload_mb"):
        AppConfig(max_upload_mb=0)
    with pytest.raises(ConfigError, match="unknown web UI setting"):
        AppConfig.from_dict({"max_upload": 3})


def test_resunet_app_binds_to_localhost_by_default():
    from resunet.cli import build_parser
    from resunet.cli.app_cmd import app_script, command

    args = build_parser().parse_args(["app", "--max-upload-mb", "50", "--model-dir", "models"])
    cmd, env = command(args)
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == str(app_script())
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.port") + 1] == "8501"
    assert cmd[cmd.index("--server.maxUploadSize") + 1] == "50"
    assert env["RESUNET_APP_MAX_UPLOAD_MB"] == "50"
    assert os.path.isabs(env["RESUNET_APP_MODEL_DIR"])
    assert app_script().is_file()
    # the page's shipped Streamlit settings ride on the command line (any working directory), once each
    flags = [c for c in cmd[5:] if c.startswith("--")]
    assert len(flags) == len(set(flags)) and len(cmd[5:]) == 2 * len(flags)
    for flag, value in [("--server.showEmailPrompt", "false"), ("--server.disconnectedSessionTTL", "120"),
                        ("--client.showErrorDetails", "none"), ("--runner.magicEnabled", "false")]:
        assert cmd[cmd.index(flag) + 1] == value
    # Streamlit's "install agent skills" toast and console advert stay off (issue 25 point 2; the browser
    # test checks the page itself)
    assert cmd[cmd.index("--logger.hideWelcomeMessage") + 1] == "true"


def test_resunet_app_serves_on_a_fresh_machine_without_asking_anything(tmp_path):
    # The README's main command on a machine where Streamlit never ran (no ~/.streamlit): Streamlit's
    # first-run "Email:" question must not hold the server back. stdin is closed, as under a
    # service manager; the page must answer its health check.
    import subprocess
    import sys

    from test_app_support import free_port, stop, wait_http

    port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "RESUNET_APP_TEMP_DIR": str(tmp_path / "sessions"),
           "RESUNET_AUDIT_DB": str(tmp_path / "audit.sqlite")}
    log = tmp_path / "app.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "resunet", "app", "--port", str(port)], env=env,
                                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT)
        try:
            answer = wait_http(f"http://127.0.0.1:{port}/_stcore/health", 90, proc)
        except (RuntimeError, TimeoutError) as err:
            answer = str(err).encode()
        finally:
            stop(proc)
    text = log.read_text(errors="replace")
    assert answer == b"ok", text[-2000:]
    assert "Email:" not in text and f"http://127.0.0.1:{port}" in text


def test_resunet_app_bad_option_is_one_line_and_exit_code_2(capsys):
    assert cli_main(["app", "--port", "70000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "resunet app: error: --port must be 1..65535, got 70000"


def test_resunet_app_hash_password_prints_a_secrets_line(monkeypatch, capsys):
    answers = iter(["pa55 word", "pa55 word"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))  # stands in for the keyboard
    assert cli_main(["app", "--hash-password"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[resunet]"
    key, _, value = out[1].partition(" = ")
    assert key == "password_hash" and verify_password("pa55 word", value.strip('"'))


def test_top_level_launcher_runs_the_packaged_page(tmp_path, monkeypatch):
    # app/webui.py (the design card's top-level app/) is a few lines that run resunet.webui's page
    from test_app_support import REPO

    launcher = REPO / "app" / "webui.py"
    assert len(launcher.read_text().splitlines()) < 15
    monkeypatch.setenv("RESUNET_APP_TEMP_DIR", str(tmp_path / "sessions"))
    at = AppTest.from_file(str(launcher), default_timeout=120).run()
    assert not at.exception
    assert at.file_uploader(key="upload") is not None and at.button(key="example") is not None


def test_newest_upload_wins():
    """Issue 25 point 3: the uploader keeps every file dropped on it; the page takes the files that are new
    since its last run (one NIfTI, one zip or one drop of DICOM files), or what is left after a removal."""
    from types import SimpleNamespace as F

    from resunet.webui.inputs import newest_upload

    first, second = F(file_id="a", name="colin27_t1.nii.gz"), F(file_id="b", name="second.nii.gz")
    assert newest_upload([first], set()) == [first]
    assert newest_upload([first, second], {"a"}) == [second]
    dicoms = [F(file_id=f"d{i}", name=f"IM{i}.dcm") for i in range(3)]
    assert newest_upload([first, *dicoms], {"a"}) == dicoms  # one drop of several DICOM files
    assert newest_upload([first], {"a", "b"}) == [first]  # the newest was removed with its x: the rest


def test_a_model_preload_running_at_exit_is_finished_before_the_interpreter_ends(tmp_path):
    """The page's background preload (PredictorCache.preload) still loading when the process exits: the
    cache's atexit hook lets it finish (no warm-up) and joins it, so no thread is inside torch while the
    interpreter finalises (that ended AppTest children with SIGABRT, "terminate called without an active
    exception"); after that no preload starts. A real tiny checkpoint, a real child interpreter."""
    import subprocess
    import sys

    from test_app_support import REPO, make_tiny_model

    model = make_tiny_model(tmp_path / "tiny.pt")
    code = (
        "import atexit, sys, threading\n"
        "from pathlib import Path\n"
        "from resunet.io.hashing import sha256_file\n"
        "from resunet.webui.runner import PredictorCache\n"
        f"m = Path({str(model)!r}); sha = sha256_file(m)\n"
        "cache = PredictorCache()\n"
        "def after():  # registered before the cache's hook, so it runs after it (atexit is last in, first out)\n"
        "    alive = [t for t in threading.enumerate() if t.name == 'resunet-preload' and t.is_alive()]\n"
        "    cache.preload(m, sha, 'cpu', True, False)\n"
        "    print('EXIT', cache.state(m, sha, 'cpu', False, False), len(alive),\n"
        "          cache.state(m, sha, 'cpu', True, False), flush=True)\n"
        "atexit.register(after)\n"
        "cache.preload(m, sha, 'cpu', False, False)\n"
        "print('LEFT', cache.state(m, sha, 'cpu', False, False), flush=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    lines = res.stdout.split()
    assert lines[:2] == ["LEFT", "loading"], res.stdout  # the script ended while the model was loading
    # at exit: the preload ended (ready, or failed: an import at interpreter shutdown may refuse, e.g.
    # concurrent.futures' "can't register atexit after shutdown"), no preload thread is left, and none
    # started after the close
    assert lines[2] == "EXIT" and lines[3] in ("ready", "failed") and lines[4:] == ["0", "absent"], \
        res.stdout + res.stderr[-2000:]
