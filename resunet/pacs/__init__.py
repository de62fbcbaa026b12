"""Talking to archives: DICOMweb (QIDO/WADO/STOW with dicomweb-client) and DIMSE (pynetdicom).

- :mod:`resunet.pacs.dicomweb`: :class:`PacsConfig`, :class:`PacsClient` (search, fetch into memory, retrieve to files, store);
- :mod:`resunet.pacs.segment`: :func:`segment_and_send` (pull, segment with the batch runner, send back),
  with the transports of :func:`segment_from_pacs` (DICOMweb) and :func:`segment_from_dimse` (DIMSE);
- :mod:`resunet.pacs.dimse_qr`: C-FIND / C-GET / C-MOVE query/retrieve (:class:`DimseSource`, :class:`QueryConfig`);
- :mod:`resunet.pacs.dimse`: :class:`StoreListener` (C-STORE SCP handing over complete series),
  :func:`send_files` (C-STORE SCU): the transport only (``resunet serve --dicom-port`` segments what arrives).

Segmentation always goes through :func:`resunet.inference.batch.run_batch` and the ``resunet.io``
writers, so a SEG from the PACS path is the same file ``resunet predict`` writes. Details: docs/pacs.md.
"""

import importlib
from typing import Any

#: public name -> submodule; imported on first use (segment pulls in torch, seconds at start-up)
_WHERE = {
    "PacsClient": "dicomweb", "PacsConfig": "dicomweb", "SeriesSummary": "dicomweb", "StudySummary": "dicomweb",
    "Destination": "dimse", "ListenerConfig": "dimse", "ReceivedSeries": "dimse",
    "StoreListener": "dimse", "send_files": "dimse", "PacsRun": "segment", "segment_from_pacs": "segment",
    "segment_and_send": "segment", "segment_from_dimse": "segment", "DimseSource": "dimse_qr",
    "QueryConfig": "dimse_qr", "find_studies": "dimse_qr", "find_series": "dimse_qr", "retrieve_study": "dimse_qr", "series_to_retrieve": "dimse_qr",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'resunet.pacs' has no attribute {name!r}")
    return getattr(importlib.import_module(f"resunet.pacs.{_WHERE[name]}"), name)
