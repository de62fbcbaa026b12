"""A pydicom decoder plugin on imagecodecs for JPEG lossless (process 14 and its selection value 1),
JPEG-LS, JPEG 2000, JPEG baseline and JPEG extended (greyscale, 8 and 12 bits).

imagecodecs' ``jpeg8_decode`` wraps libjpeg-turbo 3, which decodes lossless JPEG (SOF3, predictors
1-7, 2-16 bits) and, unlike GDCM and pylibjpeg-libjpeg, releases the GIL while it decodes: frames can
be decoded by threads in the calling process, with no worker processes to start, no pipe to cross,
and no abort on a damaged stream (it raises ``imagecodecs.Jpeg8Error``). Measured on a 512x512 16-bit
CT frame (bench/results/io_decoders.md, load 6-7): the codec 1.5-3.1 ms for every predictor and depth;
a file's whole ``pixel_array`` 2.5-2.6 ms against GDCM 6.0-8.8 and pylibjpeg-libjpeg 15.7-24.0.

JPEG-LS goes through imagecodecs' CharLS (the codec pyjpegls wraps too, about as fast a frame), which
releases the GIL as well: 300 slices read in threads in 1.8-4.1 s against 3.1-4.4 s in worker
processes with pyjpegls (load 7-8, alternating in one process).

JPEG 2000 goes through imagecodecs' OpenJPEG (the library pylibjpeg-openjpeg wraps): lossless 300
slices in threads 7.1-11.1 s against 7.8-13.2 s in processes; lossy (10:1) 3.2-3.6 s against 3.8-4.2 s
(load 1-2): resunet prefers it for both.

JPEG baseline (8-bit, greyscale) goes through the same libjpeg-turbo as pydicom's Pillow plugin (the
same integer IDCT, so the same values), but Pillow holds the GIL around its decode and resunet decoded
those files in worker processes: 300 slices in threads here against worker processes with Pillow
are in bench/results/io.md. JPEG extended (process 2 and 4: 8 or 12 bits) goes through libjpeg-turbo 3
too, whose 12-bit decoder is IJG's islow IDCT as in GDCM: its values equal SimpleITK's (GDCM's) on
every voxel, where pylibjpeg-libjpeg (the only plugin of pydicom's that reads 12-bit JPEG, in worker
processes: it holds the GIL) rounds about 1% of them one the other way; 300 slices of 12-bit CT
in threads 0.53 s against 1.47 s with pylibjpeg-libjpeg in processes, SimpleITK 0.99-1.06 s
(bench/results/io_decoders.md).

Registered with pydicom's decoders for these syntaxes by :func:`register` (pydicom 3's
``Decoder.add_plugin``, label ``"imagecodecs"``), so pydicom does the rest of the processing (unused
bits, sign) as for its own plugins. What this plugin does not handle it refuses with an exception, and
resunet's next plugin (:func:`resunet.dicom_decode.plugin_order`: pylibjpeg-libjpeg, pyjpegls,
pylibjpeg-openjpeg) decodes the file: colour (more than one component), a lossless JPEG point
transform other than 0 (not tested against a reference here), a frame whose size or precision is not
what the data set says.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from pydicom import uid

if TYPE_CHECKING:
    from pydicom.pixels.decoders.base import DecodeRunner

#: the plugin's label in pydicom's decoders (``decoding_plugin=``)
LABEL = "imagecodecs"
#: pydicom's plugin interface: what each syntax needs (shown by pydicom when it is missing)
DECODER_DEPENDENCIES = {
    uid.JPEGLossless: ("numpy", "imagecodecs>=2024.1.1"),
    uid.JPEGLosslessSV1: ("numpy", "imagecodecs>=2024.1.1"),
    uid.JPEGLSLossless: ("numpy", "imagecodecs>=2024.1.1"),
    uid.JPEGLSNearLossless: ("numpy", "imagecodecs>=2024.1.1"),
    uid.JPEG2000Lossless: ("numpy", "imagecodecs>=2024.1.1"),
    uid.JPEG2000: ("numpy", "imagecodecs>=2024.1.1"),
    uid.JPEGBaseline8Bit: ("numpy", "imagecodecs>=2024.1.1"),
    uid.JPEGExtended12Bit: ("numpy", "imagecodecs>=2024.1.1"),
}
_JPEG_LS = (uid.JPEGLSLossless, uid.JPEGLSNearLossless)
_JPEG_2000 = (uid.JPEG2000Lossless, uid.JPEG2000)


def _libjpeg_turbo_version() -> tuple[int, ...]:
    """libjpeg-turbo's version inside imagecodecs, () when imagecodecs or its JPEG codec is missing."""
    try:
        import imagecodecs
    except ImportError:
        return ()
    if not getattr(getattr(imagecodecs, "JPEG8", None), "available", False):
        return ()
    # e.g. 'libjpeg_turbo 3.1.3/8.0'
    text = str(imagecodecs.jpeg8_version()).split()[-1].split("/")[0]
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        return ()


def is_available(uid_: str) -> bool:
    """True if imagecodecs is installed with a libjpeg-turbo that decodes lossless and 12-bit lossy JPEG
    (3.0 or later; any for baseline), or, for JPEG-LS and JPEG 2000, with its CharLS or OpenJPEG codec."""
    if uid_ in _JPEG_LS or uid_ in _JPEG_2000:
        try:
            import imagecodecs
        except ImportError:
            return False
        codec = "JPEGLS" if uid_ in _JPEG_LS else "JPEG2K"
        return bool(getattr(getattr(imagecodecs, codec, None), "available", False))
    if uid_ == uid.JPEGBaseline8Bit:  # every libjpeg-turbo decodes baseline JPEG
        return _libjpeg_turbo_version() >= (1,)
    return uid_ in DECODER_DEPENDENCIES and _libjpeg_turbo_version() >= (3, 0)


def frame_parameters(src: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int, int]:
    """The lossless JPEG frame's ``(precision bits, rows, columns, components, predictor, point
    transform)`` from its SOF3 and first SOS segments.

    Hand-written: pydicom's ``_get_jpg_parameters`` stops at the SOF and gives neither the predictor nor
    the point transform; it walks a few marker segments (no entropy-coded data).

    Raises:
        ValueError: not a lossless (SOF3) JPEG stream, or its header ends early.
    """
    data = bytes(src[:4096]) if len(src) > 4096 else bytes(src)
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG stream (no SOI marker)")
    pos, sof = 2, None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"no JPEG marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        (length,) = struct.unpack(">H", data[pos + 2: pos + 4])
        seg = data[pos + 4: pos + 2 + length]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if marker != 0xC3:
                raise ValueError(f"not a lossless (SOF3) JPEG frame (SOF{marker - 0xC0})")
            if len(seg) < 6:
                break
            sof = (seg[0], *struct.unpack(">HH", seg[1:5]), seg[5])
        elif marker == 0xDA:
            if sof is None or len(seg) < 1 + 2 * seg[0] + 3:
                break
            ns = seg[0]
            predictor, point_transform = seg[1 + 2 * ns], seg[3 + 2 * ns] & 0x0F
            return (*sof, predictor, point_transform)
        pos += 2 + length
    raise ValueError("the JPEG header ends before its first scan (SOF3 and SOS segments)")


def _decode_frame(src: bytes, runner: DecodeRunner) -> bytes | bytearray:
    """pydicom's plugin function: the decoded frame ``src`` as bytes in the runner's BitsAllocated
    container (native byte order, stored values as encoded; pydicom corrects unused bits and sign).

    Raises:
        NotImplementedError: what this plugin leaves to the next one (colour, point transform).
        ValueError: the frame is not what the data set says (size, precision).
        imagecodecs.Jpeg8Error (JpeglsError, Jpeg2kError): the codec cannot decode the stream (damaged).
    """
    if runner.transfer_syntax in _JPEG_LS:
        return _decode_jpeg_ls(src, runner)
    if runner.transfer_syntax in _JPEG_2000:
        return _decode_jpeg_2000(src, runner)
    if runner.transfer_syntax in (uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit):
        return _decode_jpeg_lossy(src, runner)
    from imagecodecs import jpeg8_decode

    precision, rows, cols, components, _predictor, point_transform = frame_parameters(src)
    if components != 1 or runner.samples_per_pixel != 1:
        raise NotImplementedError("imagecodecs plugin: greyscale (one component) only")
    if point_transform:
        raise NotImplementedError(f"imagecodecs plugin: point transform {point_transform} not supported")
    if (rows, cols) != (runner.rows, runner.columns):
        raise ValueError(f"the JPEG frame is {rows}x{cols}, the data set says {runner.rows}x{runner.columns}")
    allocated = runner.bits_allocated
    if precision > allocated or allocated not in (8, 16, 32):
        raise ValueError(f"JPEG precision {precision} bits does not fit BitsAllocated {allocated}")
    arr = jpeg8_decode(src)  # uint8 (precision <= 8) or uint16; releases the GIL while it decodes
    if arr.shape != (rows, cols):
        raise ValueError(f"decoded frame has shape {arr.shape}, expected {(rows, cols)}")
    if arr.dtype.itemsize * 8 != allocated:
        arr = arr.astype(f"u{allocated // 8}")
    return arr.tobytes()


def _decode_jpeg_lossy(src: bytes, runner: DecodeRunner) -> bytes:
    """A greyscale JPEG baseline (8-bit) or extended (8 or 12-bit) frame through libjpeg-turbo, in the
    runner's BitsAllocated container (colour is left to Pillow, which applies DICOM's YCbCr rules, and
    to pylibjpeg-libjpeg)."""
    from imagecodecs import jpeg8_decode

    allocated = runner.bits_allocated
    if runner.samples_per_pixel != 1 or allocated not in (8, 16):
        raise NotImplementedError("imagecodecs plugin: greyscale 8 or 16-bit-allocated lossy JPEG only")
    arr = jpeg8_decode(src)  # uint8 (8-bit precision) or uint16 (12-bit); releases the GIL while it decodes
    if arr.ndim != 2:
        raise NotImplementedError("imagecodecs plugin: greyscale (one component) lossy JPEG only")
    if arr.shape != (runner.rows, runner.columns):
        raise ValueError(f"the JPEG frame is {arr.shape[0]}x{arr.shape[1]}, the data set says {runner.rows}x{runner.columns}")
    if arr.dtype.itemsize * 8 > allocated:
        raise ValueError(f"the JPEG frame has 12-bit precision, the data set says BitsAllocated {allocated}")
    if arr.dtype.itemsize * 8 != allocated:
        arr = arr.astype("u2")
    return arr.tobytes()


def _decode_jpeg_ls(src: bytes, runner: DecodeRunner) -> bytes:
    """A JPEG-LS frame through imagecodecs' CharLS, as pydicom's pyjpegls plugin returns it (the stored
    values in a container of the stream's precision; pydicom corrects the sign)."""
    from imagecodecs import jpegls_decode

    arr = jpegls_decode(src)  # releases the GIL while it decodes
    if arr.ndim != 2 or runner.samples_per_pixel != 1:
        raise NotImplementedError("imagecodecs plugin: greyscale (one component) JPEG-LS only")
    if arr.shape != (runner.rows, runner.columns):
        raise ValueError(f"the JPEG-LS frame is {arr.shape[0]}x{arr.shape[1]}, the data set says {runner.rows}x{runner.columns}")
    runner.set_option("bits_allocated", 8 * arr.dtype.itemsize)
    return arr.tobytes()


def _decode_jpeg_2000(src: bytes, runner: DecodeRunner) -> bytes:
    """A JPEG 2000 frame through imagecodecs' OpenJPEG, as pydicom's pylibjpeg-openjpeg plugin returns
    it: the values in a container of the codestream's precision (signed if the codestream is; pydicom
    corrects a sign that differs from PixelRepresentation)."""
    from imagecodecs import jpeg2k_decode

    if runner.samples_per_pixel != 1:
        raise NotImplementedError("imagecodecs plugin: greyscale (one component) JPEG 2000 only")
    arr = jpeg2k_decode(src)  # releases the GIL while it decodes
    if arr.shape != (runner.rows, runner.columns):
        raise ValueError(f"the JPEG 2000 frame has shape {arr.shape}, the data set says {runner.rows}x{runner.columns}")
    precision = runner.get_option("j2k_precision", runner.bits_stored)
    bits = 8 if precision <= 8 else 16 if precision <= 16 else 32
    if arr.dtype.itemsize * 8 != bits:
        arr = arr.astype(f"{arr.dtype.kind}{bits // 8}")
    runner.set_option("bits_allocated", bits)
    return arr.tobytes()


def register() -> bool:
    """Add the plugin to pydicom's JPEG lossless decoders (once; later calls do nothing). True if it is
    available there (imagecodecs with libjpeg-turbo 3 installed)."""
    from pydicom.pixels import get_decoder

    ok = True
    for ts in DECODER_DEPENDENCIES:
        decoder = get_decoder(ts)
        if LABEL not in decoder._available and LABEL not in decoder._unavailable:  # noqa: SLF001 - no public query of unavailable ones
            decoder.add_plugin(LABEL, (__name__, "_decode_frame"))
        ok = ok and LABEL in decoder.available_plugins
    return ok
