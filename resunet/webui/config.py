"""Settings of the web UI, every default in one place.

``resunet app`` passes its options to the Streamlit process as environment variables
(``RESUNET_APP_*``, see :data:`ENV`), because ``streamlit run`` starts the page in its own process.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from resunet.errors import ConfigError
from resunet.package_data import EXAMPLE_BRAINMASK, EXAMPLE_T1, MODEL_DIR

#: the bundled models and example study, shipped inside the package (resunet/data/)
DEFAULT_MODEL_DIR = MODEL_DIR
DEFAULT_MODEL_NAME = "brain_extraction.pt"
EXAMPLE_STUDY = EXAMPLE_T1
EXAMPLE_REFERENCE = EXAMPLE_BRAINMASK


@dataclass
class AppConfig:
    """Web UI settings.

    Args:
        model_dir: folder whose ``*.pt`` checkpoints the model picker lists.
        default_model: file name in ``model_dir`` selected at start (the bundled model).
        example_study: the study the "Example study" button opens.
        example_reference: its reference mask (offered for the metrics demo).
        max_upload_mb: largest upload accepted, MB (also Streamlit's ``server.maxUploadSize``).
        session_ttl_min: minutes of inactivity after which a session's uploads and results are deleted.
        session_close_s: seconds after a browser tab closed (no heartbeat from the page) after which its
            uploads and results are deleted.
        temp_dir: parent folder of the per-session temp folders.
        device: ``auto``, ``cpu`` or ``cuda`` for inference.
        tolerance_mm: NSD tolerance in mm for the metrics against a reference mask.
        service_url: base URL of a ``resunet serve --require-review`` whose held jobs the page lists under
            "To review" (empty: no list). Its bearer token is a secret, not a setting: ``RESUNET_SERVICE_TOKEN``
            or ``[resunet] service_token`` in ``.streamlit/secrets.toml`` (:mod:`resunet.webui.review_queue`).
        service_timeout_s: seconds the page waits for the service to answer one request.
        pacs_url: the archive for "Browse PACS" (empty: no PACS list): a DICOMweb root (credentials from
            ``RESUNET_PACS_USER``/``RESUNET_PACS_PASSWORD`` or ``RESUNET_PACS_TOKEN``, docs/pacs.md) or
            ``dimse://AET@HOST:PORT`` (C-FIND, C-GET/C-MOVE, C-STORE).
        pacs_ae_title: our AE title towards a DIMSE archive (it must know it).
        pacs_move_port: DIMSE: retrieve with C-MOVE to ``pacs_ae_title`` on this port (the archive's
            entry for us); 0: C-GET.
    """

    model_dir: Path = DEFAULT_MODEL_DIR
    default_model: str = DEFAULT_MODEL_NAME
    example_study: Path = EXAMPLE_STUDY
    example_reference: Path = EXAMPLE_REFERENCE
    max_upload_mb: int = 1024
    session_ttl_min: float = 60.0
    session_close_s: float = 120.0
    temp_dir: Path = Path(tempfile.gettempdir()) / "resunet-app"
    device: str = "auto"
    tolerance_mm: float = 2.0
    pacs_url: str = ""
    service_url: str = ""
    service_timeout_s: float = 120.0
    pacs_ae_title: str = "RESUNET"
    pacs_move_port: int = 0

    def __post_init__(self) -> None:
        for name in ("model_dir", "example_study", "example_reference", "temp_dir"):
            setattr(self, name, Path(getattr(self, name)).expanduser())
        try:
            self.max_upload_mb = int(self.max_upload_mb)
            self.session_ttl_min = float(self.session_ttl_min)
            self.session_close_s = float(self.session_close_s)
            self.tolerance_mm = float(self.tolerance_mm)
            self.service_timeout_s = float(self.service_timeout_s)
            self.pacs_move_port = int(self.pacs_move_port or 0)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"web UI setting has a wrong value: {err}") from None
        if self.max_upload_mb < 1:
            raise ConfigError(f"max_upload_mb must be at least 1, got {self.max_upload_mb}")
        if self.session_ttl_min <= 0:
            raise ConfigError(f"session_ttl_min must be positive, got {self.session_ttl_min}")
        if self.session_close_s < 2:
            raise ConfigError(f"session_close_s must be at least 2 seconds, got {self.session_close_s}")
        self.service_url = str(self.service_url or "").strip().rstrip("/")
        if self.service_url and not self.service_url.startswith(("http://", "https://")):
            raise ConfigError(f"service_url must start with http:// or https://, got {self.service_url!r}")
        if self.service_timeout_s <= 0:
            raise ConfigError(f"service_timeout_s must be positive, got {self.service_timeout_s}")
        if not 0 <= self.pacs_move_port < 65536:
            raise ConfigError(f"pacs_move_port must be a TCP port (1-65535) or 0 for C-GET, got {self.pacs_move_port}")
        if self.pacs_url and str(self.pacs_url).strip().lower().startswith(("dimse://", "dimses://")):
            from resunet.pacs.dimse_qr import DimseSource  # light: pynetdicom is imported on first use

            DimseSource.parse(self.pacs_url)  # a bad URL is refused at start, with the form to use
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")

    @property
    def default_model_path(self) -> Path:
        return self.model_dir / self.default_model

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AppConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown web UI setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**dict(d))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "AppConfig":
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError("web UI config YAML must be a mapping of setting: value")
        return cls.from_dict(data)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "AppConfig":
        """Defaults, then ``RESUNET_APP_CONFIG`` (a YAML file), then single ``RESUNET_APP_<SETTING>`` variables."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        cfg_file = env.get("RESUNET_APP_CONFIG")
        if cfg_file:
            try:
                values.update(cls.from_yaml(Path(cfg_file).read_text(encoding="utf-8")).to_dict())
            except OSError as err:
                raise ConfigError(f"cannot read web UI config {cfg_file}: {err.strerror}") from None
        for f in fields(cls):
            key = ENV[f.name]
            if env.get(key):
                values[f.name] = env[key]
        return cls.from_dict(values)


#: Environment variable of each setting.
ENV: dict[str, str] = {f.name: f"RESUNET_APP_{f.name.upper()}" for f in fields(AppConfig)}
