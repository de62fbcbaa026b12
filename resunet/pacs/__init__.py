"""Talking to archives: DICOMweb (QIDO/WADO/STOW with dicomweb-client) and DIMSE (pynetdicom).

- :mod:`resunet.pacs.dicomweb`: :class:`PacsConfig`, :class:`PacsClient` (search, retrieve, store);
- :mod:`resunet.pacs.segment`: :func:`segment_from_pacs` (pull, segment with the batch runner, STOW back);
- :mod:`resunet.pacs.dimse`: :class:`StoreListener` (C-STORE SCP), :class:`DicomNode` (listener that
  segments complete series and sends the results on), :func:`send_files` (C-STORE SCU).

Segmentation always goes through :func:`resunet.inference.batch.run_batch` and the ``resunet.io``
writers, so a SEG from the PACS path is the same file ``resunet predict`` writes. Details: docs/pacs.md.
"""

import importlib
from typing import Any

#: public name -> submodule; imported on first use (segment pulls in torch, seconds at start-up)
_WHERE = {
    "PacsClient": "dicomweb", "PacsConfig": "dicomweb", "SeriesSummary": "dicomweb", "StudySummary": "dicomweb",
    "Destination": "dimse", "DicomNode": "dimse", "ListenerConfig": "dimse", "ReceivedSeries": "dimse",
    "StoreListener": "dimse", "send_files": "dimse", "PacsRun": "segment", "segment_from_pacs": "segment",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'resunet.pacs' has no attribute {name!r}")
    return getattr(importlib.import_module(f"resunet.pacs.{_WHERE[name]}"), name)
