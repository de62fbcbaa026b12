"""Reading and writing scans: one :class:`Volume` type carries voxels and exact geometry."""

from resunet.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from resunet.io.hashing import sha256_file, sha256_path
from resunet.io.volume import Volume

__all__ = ["Volume", "atomic_path", "atomic_write_bytes", "atomic_write_text", "sha256_file", "sha256_path"]
