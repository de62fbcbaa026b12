"""Talking to archives: DICOMweb (QIDO/WADO/STOW with dicomweb-client) and DIMSE (pynetdicom).

- :mod:`resunet.pacs.dicomweb`: :class:`PacsConfig`, :class:`PacsClient` (search, retrieve, store);
- :mod:`resunet.pacs.segment`: :func:`segment_from_pacs` (pull, segment with the batch runner, STOW back);
- :mod:`resunet.pacs.dimse`: :class:`StoreListener` (C-STORE SCP), :class:`DicomNode` (listener that
  segments complete series and sends the results on), :func:`send_files` (C-STORE SCU).

Segmentation always goes through :func:`resunet.inference.batch.run_batch` and the ``resunet.io``
writers, so a SEG from the PACS path is the same file ``resunet predict`` writes. Details: docs/pacs.md.
"""

from resunet.pacs.dicomweb import PacsClient, PacsConfig, SeriesSummary, StudySummary
from resunet.pacs.dimse import DicomNode, Destination, ListenerConfig, ReceivedSeries, StoreListener, send_files
from resunet.pacs.segment import PacsRun, segment_from_pacs

__all__ = [
    "Destination", "DicomNode", "ListenerConfig", "PacsClient", "PacsConfig", "PacsRun", "ReceivedSeries",
    "SeriesSummary", "StoreListener", "StudySummary", "segment_from_pacs", "send_files",
]
