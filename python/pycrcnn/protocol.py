"""The wire format of ``POST /compute``, shared by :mod:`pycrcnn.server` and :mod:`pycrcnn.client`.

A request or a response travels in one of two forms (the response uses the
form of its request); ``docs/openapi.yaml`` is the full description.

**JSON** (``Content-Type: application/json``): one object. Binary fields are
standard base64 (RFC 4648, with padding) strings: ``public_context`` and
``data`` in a request, ``data`` in a response.

**Binary** (``Content-Type: application/x-pycrcnn``), for large tensors (no
base64 inflation, no JSON parsing of megabytes)::

    request  = "PCRQ" | u32 header_len | header (UTF-8 JSON object)
               | u64 len | public_context bytes | u64 len | data bytes
    response = "PCRS" | u32 header_len | header (UTF-8 JSON object)
               | u64 len | data bytes

Integers are unsigned big-endian; the frame ends exactly after the last blob.
The header holds every JSON field except the blobs. Blobs are opaque here:
``public_context`` is ``Context.public_context()`` and ``data`` is
``CipherTensor.to_bytes()``, each carrying its own magic, version, parameter
fingerprint, key id and checksum, checked by the engine when parsed.

Nothing in this module (nor in the server) unpickles anything.
"""
from __future__ import annotations

import base64
import binascii
import json
import struct
from typing import Any, Dict, List, Sequence, Tuple

__all__ = [
    "BINARY_CONTENT_TYPE",
    "JSON_CONTENT_TYPE",
    "REQUEST_MAGIC",
    "RESPONSE_MAGIC",
    "MAX_HEADER_BYTES",
    "ProtocolError",
    "encode_frame",
    "decode_frame",
    "encode_request",
    "decode_request",
    "encode_response",
    "decode_response",
    "b64encode",
    "b64decode",
    "looks_like_jsonpickle",
    "SEED_REQUEST_HINT",
]

#: media type of the binary form
BINARY_CONTENT_TYPE = "application/x-pycrcnn"
#: media type of the JSON form
JSON_CONTENT_TYPE = "application/json"
#: first four bytes of a binary request
REQUEST_MAGIC = b"PCRQ"
#: first four bytes of a binary response
RESPONSE_MAGIC = b"PCRS"
#: largest JSON header accepted in a binary frame
MAX_HEADER_BYTES = 1 << 20

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

#: what a client of the original PyCrCNN is told
SEED_REQUEST_HINT = (
    "this looks like a request of the original PyCrCNN (jsonpickle-encoded data); this server never "
    "unpickles request data. Send an encrypted tensor with the pycrcnn client instead: "
    "pycrcnn.client.Client(address).compute(ctx, ctx.encrypt(x), net) or "
    "`python -m pycrcnn.client --config parameters.json --mnist 16`"
)


class ProtocolError(ValueError):
    """A body that does not follow the wire format (the server answers 400)."""


def encode_frame(magic: bytes, header: Dict[str, Any], blobs: Sequence[bytes]) -> bytes:
    """``magic | u32 len | JSON header | (u64 len | blob)*``."""
    if len(magic) != 4:
        raise ValueError("the magic is 4 bytes")
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError(f"JSON header of {len(head)} bytes; at most {MAX_HEADER_BYTES}")
    parts: List[bytes] = [magic, _U32.pack(len(head)), head]
    for blob in blobs:
        parts.append(_U64.pack(len(blob)))
        parts.append(bytes(blob) if not isinstance(blob, bytes) else blob)
    return b"".join(parts)


def decode_frame(body: bytes, magic: bytes, n_blobs: int) -> Tuple[Dict[str, Any], List[bytes]]:
    """Parses a frame written by :func:`encode_frame`; every length is checked
    against the body before it is used. Raises :class:`ProtocolError`."""
    what = "request" if magic == REQUEST_MAGIC else "response"
    view = memoryview(body)
    if len(view) < 8:
        raise ProtocolError(f"binary {what} of {len(view)} bytes is too short for its 8-byte preamble")
    if bytes(view[:4]) != magic:
        raise ProtocolError(
            f"binary {what} must start with the magic {magic!r}, found {bytes(view[:4])!r}")
    (hlen,) = _U32.unpack_from(view, 4)
    if hlen > MAX_HEADER_BYTES:
        raise ProtocolError(f"JSON header length {hlen} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    pos = 8
    if pos + hlen > len(view):
        raise ProtocolError(f"truncated {what}: the JSON header needs {hlen} bytes, {len(view) - pos} remain")
    try:
        header = json.loads(bytes(view[pos:pos + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
        raise ProtocolError(f"the JSON header of the binary {what} is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"the JSON header of the binary {what} must be an object, got {type(header).__name__}")
    pos += hlen
    blobs: List[bytes] = []
    for i in range(n_blobs):
        if pos + 8 > len(view):
            raise ProtocolError(f"truncated {what}: blob {i + 1} of {n_blobs} has no length field")
        (blen,) = _U64.unpack_from(view, pos)
        pos += 8
        if blen > len(view) - pos:
            raise ProtocolError(
                f"truncated {what}: blob {i + 1} of {n_blobs} declares {blen} bytes, {len(view) - pos} remain")
        blobs.append(bytes(view[pos:pos + blen]))
        pos += blen
    if pos != len(view):
        raise ProtocolError(f"{len(view) - pos} unexpected bytes after the last blob of the binary {what}")
    return header, blobs


def encode_request(header: Dict[str, Any], public_context: bytes, data: bytes) -> bytes:
    """A binary ``/compute`` request."""
    return encode_frame(REQUEST_MAGIC, header, [public_context, data])


def decode_request(body: bytes) -> Tuple[Dict[str, Any], bytes, bytes]:
    """``(header, public_context, data)`` of a binary request."""
    header, (public_context, data) = decode_frame(body, REQUEST_MAGIC, 2)
    return header, public_context, data


def encode_response(header: Dict[str, Any], data: bytes) -> bytes:
    """A binary ``/compute`` response."""
    return encode_frame(RESPONSE_MAGIC, header, [data])


def decode_response(body: bytes) -> Tuple[Dict[str, Any], bytes]:
    """``(header, data)`` of a binary response."""
    header, (data,) = decode_frame(body, RESPONSE_MAGIC, 1)
    return header, data


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: Any, field: str) -> bytes:
    """Strict base64 (a bad character or padding is an error, not skipped)."""
    if not isinstance(text, str):
        raise ProtocolError(f"{field!r} must be a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"{field!r} is not valid base64: {exc}") from None


def looks_like_jsonpickle(obj: Any, depth: int = 0) -> bool:
    """True for jsonpickle output: objects with ``py/...`` keys (``py/object``,
    ``py/reduce``, ``py/b64``, ...), looked for a few levels deep."""
    if depth > 6:
        return False
    if isinstance(obj, dict):
        if any(isinstance(k, str) and k.startswith("py/") for k in obj):
            return True
        return any(looks_like_jsonpickle(v, depth + 1) for v in list(obj.values())[:64])
    if isinstance(obj, list):
        return any(looks_like_jsonpickle(v, depth + 1) for v in obj[:8])
    if isinstance(obj, str):
        s = obj.lstrip()[:4096]
        return s[:1] in ("{", "[") and '"py/' in s
    return False
