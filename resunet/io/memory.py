"""DICOM instances held in memory: a study pulled from an archive, read without writing it to disk.

A :class:`MemoryStudy` is what a folder of DICOM files would be, as ``{relative name: file bytes}``
(each value a whole DICOM file: preamble, ``DICM``, file meta, data set in its stored transfer
syntax, exactly as a WADO-RS part or a C-STORE carries it). :func:`resunet.io.loader.load_study`
takes one wherever it takes a folder, and reads it through the very code that reads files (the
series scan, :mod:`resunet.io.dicom_geometry`, :mod:`resunet.io.dicom_pixels` and the per-syntax
decoders of :mod:`resunet.dicom_decode`): one reader, two sources of bytes.

Light on purpose (hashlib only): the PACS transports build one before anything else of
``resunet.io`` is imported.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MemoryStudy:
    """DICOM files in memory, by relative name (``<series>/<n>.dcm``).

    Attributes:
        name: how messages and records name the study (a study UID, never a patient name); also
            the folder name the instances would have had on disk.
        files: relative POSIX name -> the bytes of one DICOM file.
    """

    name: str
    files: Mapping[str, bytes] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def nbytes(self) -> int:
        """Total size of the instances (bytes)."""
        return sum(len(b) for b in self.files.values())

    def label(self, rel: str) -> str:
        """How one instance is named in messages and in ``Volume.meta["dicom_files"]``."""
        return f"{self.name}/{rel}"

    def sha256(self) -> str:
        """The hex SHA-256 :func:`resunet.io.hashing.sha256_path` gives the same files in a folder
        (relative name and bytes of each, sorted), so a record's input hash does not depend on
        whether the study was read from disk or from memory."""
        h = hashlib.sha256()
        for rel in sorted(self.files, key=lambda r: r.split("/")):  # as Paths sort: part by part
            h.update(rel.encode("utf-8") + b"\0")
            h.update(hashlib.sha256(self.files[rel]).hexdigest().encode("ascii"))
        return h.hexdigest()
