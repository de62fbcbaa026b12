"""A real Orthanc PACS on loopback for the PACS tests and ``bench/bench_pacs.py`` (no tests here).

Debian's ``orthanc`` (1.10) with the ``orthanc-dicomweb`` plugin (``scripts/setup-system.sh`` installs both) is
started on free loopback ports with a config written into a temp folder (storage there too), and
stopped afterwards. Nothing is mocked: QIDO/WADO/STOW and C-STORE go to the real server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_app_support import EXAMPLE_DICOM, free_port, stop, wait_http

#: where Debian's orthanc-dicomweb package puts the plugin (the first that exists is used)
PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so.1.7",
)
ORTHANC_AET = "ORTHANC"


def orthanc_binary() -> str | None:
    """Path of the Orthanc server binary, or None when it is not installed."""
    return shutil.which("Orthanc") or (("/usr/sbin/Orthanc") if Path("/usr/sbin/Orthanc").exists() else None)


def dicomweb_plugin() -> str | None:
    """Path of the DICOMweb plugin library, or None."""
    return next((p for p in PLUGIN_CANDIDATES if Path(p).exists()), None)


@dataclass
class Orthanc:
    """A running Orthanc: ``url`` (REST root), ``dicomweb`` (DICOMweb root), DICOM ``port``/``aet``."""

    proc: subprocess.Popen
    url: str
    dicomweb: str
    port: int
    aet: str
    folder: Path

    def upload(self, files: list[Path]) -> list[str]:
        """Store files through Orthanc's REST ``POST /instances``; returns the Orthanc instance ids."""
        ids = []
        for f in files:
            req = urllib.request.Request(f"{self.url}/instances", data=Path(f).read_bytes(), method="POST",
                                         headers={"Content-Type": "application/dicom"})
            with urllib.request.urlopen(req, timeout=30) as r:
                ids.append(json.loads(r.read())["ID"])
        return ids

    def get(self, path: str):
        """JSON of ``GET {url}{path}``."""
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        stop(self.proc)


def start_orthanc(folder: Path, modalities: dict[str, tuple[str, str, int]] | None = None,
                  extra: dict | None = None) -> Orthanc:
    """Start Orthanc with its storage and config in ``folder``; waits until its REST API answers.

    Args:
        folder: empty temp folder (config, database and log go there).
        modalities: DICOM nodes Orthanc may send to, ``{name: (AE title, host, port)}``.
        extra: more configuration keys (e.g. DICOM TLS).
    """
    binary, plugin = orthanc_binary(), dicomweb_plugin()
    if binary is None or plugin is None:
        raise RuntimeError("Orthanc and its DICOMweb plugin are not installed: apt-get install orthanc orthanc-dicomweb")
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "resunet-test",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ORTHANC_AET,
        "RemoteAccessAllowed": False,  # loopback only
        "AuthenticationEnabled": False,
        "HttpsCACertificates": "",
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
        "DicomModalities": {name: list(v) for name, v in (modalities or {}).items()},
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "StableAge": 2,
        "ConcurrentJobs": 2,
        **(extra or {}),
    }
    cfg = folder / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=1))
    log = open(folder / "orthanc.log", "wb")
    proc = subprocess.Popen([binary, str(cfg)], stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    log.close()
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_http(f"{url}/system", timeout=60, proc=proc)
    except Exception:
        stop(proc)
        raise RuntimeError(f"Orthanc did not start; its log:\n{(folder / 'orthanc.log').read_text(errors='replace')[-3000:]}")
    return Orthanc(proc=proc, url=url, dicomweb=f"{url}/dicom-web", port=dicom_port, aet=ORTHANC_AET, folder=folder)


def example_orthanc(folder: Path, modalities: dict[str, tuple[str, str, int]] | None = None) -> Iterator[Orthanc]:
    """A real Orthanc holding the example DICOM study, for a module fixture (``yield from example_orthanc(...)``).

    Without Debian's orthanc + orthanc-dicomweb the test fails under ``CI=true`` and is skipped elsewhere.
    """
    if orthanc_binary() is None or dicomweb_plugin() is None:
        msg = "Debian orthanc + orthanc-dicomweb not installed (scripts/setup-system.sh installs them)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    server = start_orthanc(folder, modalities)
    try:
        server.upload(sorted(EXAMPLE_DICOM.glob("*.dcm")))
        yield server
    finally:
        server.stop()


def series_of_modality(orthanc: Orthanc, study_uid: str, modality: str = "SEG") -> set[str]:
    """Series Instance UIDs of ``modality`` in the study, as the archive lists them (QIDO-RS)."""
    from resunet.pacs import PacsClient, PacsConfig

    return {s.series_uid for s in PacsClient(PacsConfig(orthanc.dicomweb)).search_series(study_uid) if s.modality == modality}
