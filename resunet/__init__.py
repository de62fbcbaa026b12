"""resunet: Residual U-Net segmentation of DICOM and NIfTI scans.

Library first: the ``resunet`` command, the batch script and the Streamlit app are thin shells over
the sub-packages ``io``, ``nets``, ``training``, ``inference``, ``evaluation`` and ``reports``.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("resunet")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
