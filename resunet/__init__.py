"""resunet: Residual U-Net segmentation of DICOM and NIfTI scans.

Library first: the ``resunet`` command, the batch script and the Streamlit app are thin shells over
the sub-packages ``io``, ``nets``, ``training``, ``inference``, ``evaluation`` and ``reports``.
"""

from typing import Any

__all__ = ["__version__"]


def __getattr__(name: str) -> Any:
    """``__version__`` on first use: importlib.metadata scans the installed distributions (0.1-0.4 s), which
    ``resunet --help`` and the service's start-up should not pay for."""
    if name != "__version__":
        raise AttributeError(f"module 'resunet' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("resunet")
    except PackageNotFoundError:  # running from a source tree that was not installed
        found = "0.0.0+unknown"
    globals()["__version__"] = found
    return found
