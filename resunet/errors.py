"""Exceptions the library raises for the user.

Library code raises these with a message that names the input and says what to do; only the CLI and
the app turn them into exit codes and on-page messages. Anything else escaping is a bug.
"""


class ResunetError(Exception):
    """Base of every user-facing error. ``str(err)`` is one readable line."""

    exit_code = 2


class InputError(ResunetError):
    """An input file or folder cannot be read or is not a usable scan."""


class GeometryError(InputError):
    """The scan's geometry cannot be represented faithfully (missing slices, gantry tilt, ...)."""


class ModelError(ResunetError):
    """A checkpoint or exported model cannot be loaded or does not fit the input."""


class ConfigError(ResunetError):
    """A configuration file or option has a wrong key or value."""


class DatasetError(ResunetError):
    """A training dataset folder is inconsistent (missing files, shape/geometry mismatch, ...)."""


class PacsError(ResunetError):
    """A PACS (DICOMweb server or DICOM node) cannot be reached, refuses a request, or lacks a study."""


class ServerError(ResunetError):
    """A fault of the server, not of the request (a state file unreadable, the disk full, the database
    down): the service answers ``http_status`` (5xx) with a message for the operator, and logs the details."""

    http_status = 503
    #: what a client is told (no paths: those are for the operator's log)
    client_text = "a fault on the server"


class DiskFullError(ServerError):
    """No space left on a disk the server writes to (507 Insufficient Storage)."""

    http_status = 507
    client_text = "no space left on the service's disk"
