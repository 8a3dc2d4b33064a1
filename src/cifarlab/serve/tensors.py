"""KServe v2 (Open Inference Protocol) tensors: a request body in, a response body out.

Both JSON tensors and the binary tensor data extension (Triton's, which ``tritonclient`` uses by
default) are read and written. Pure functions over bytes: the routes are in :mod:`.kserve`.

- Request: a JSON header (the whole body, or its first ``Inference-Header-Content-Length``
  bytes), then the raw bytes of each input with ``parameters.binary_data_size``, in input order.
  Bodies may be gzip- or deflate-encoded (``Content-Encoding``).
- ``BYTES`` elements are raw bytes in binary data (each one a 4-byte little-endian length, then
  the bytes) and base64 strings in JSON (an encoded image is not valid UTF-8 text).
- Response: outputs asked for with ``binary_data`` (or, with no ``outputs``, request parameter
  ``binary_data_output``) go after the JSON header as raw bytes, the header's length in the
  ``Inference-Header-Content-Length`` response header.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cifarlab.serve.errors import ApiError

__all__ = ["DTYPES", "Output", "V2Request", "decompress", "encode_response", "parse_request",
           "parse_request_values", "split_body"]

# v2 datatype -> numpy dtype (little-endian, as the binary extension specifies)
DTYPES: dict[str, str] = {"BOOL": "?", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4",
                          "UINT64": "<u8", "INT8": "i1", "INT16": "<i2", "INT32": "<i4",
                          "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}


@dataclass
class V2Request:
    id: str | None
    inputs: dict[str, np.ndarray]  # BYTES inputs: 1-D object arrays of bytes
    outputs: list[tuple[str, bool]] | None  # (name, binary) asked for; None: all
    binary_output: bool  # request parameter binary_data_output
    datatypes: dict[str, str] = field(default_factory=dict)


@dataclass
class Output:
    name: str
    datatype: str
    value: np.ndarray  # BYTES: 1-D object array of bytes


def decompress(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """Undo ``Content-Encoding: gzip`` or ``deflate``, refusing (413) output over ``max_bytes``
    without inflating past it."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ApiError(415, f"Content-Encoding {encoding!r} is not supported; send gzip, deflate "
                            "or an unencoded body.")
    d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = d.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise ApiError(400, f"The {encoding} body cannot be decompressed ({exc}).") from None
    if len(out) > max_bytes:
        raise ApiError(413, f"The {encoding} body inflates to more than the "
                            f"{max_bytes / 2**20:g} MiB upload limit (`cifarlab serve "
                            "--max-upload-mb`).")
    return out


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary data) of a request body."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise ApiError(400, f"Inference-Header-Content-Length must be an integer, got "
                            f"{header_length!r}.") from None
    if not 0 < n <= len(body):
        raise ApiError(400, f"Inference-Header-Content-Length is {n} but the body has "
                            f"{len(body)} bytes.")
    return body[:n], body[n:]


def parse_request(header: bytes, binary: bytes) -> V2Request:
    """Parse an inference request (raises :class:`ApiError` 400 naming the field)."""
    try:
        doc = json.loads(header)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"The request is not valid JSON ({exc}).") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "The request must be a JSON object with an 'inputs' list.")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ApiError(400, "'inputs' must be a non-empty list of tensors.")
    params = _dict(doc.get("parameters"), "parameters")
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for k, t in enumerate(raw_inputs):
        where = f"inputs[{k}]"
        t = _dict(t, where)
        name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
        if not isinstance(name, str) or not name:
            raise ApiError(400, f"{where}.name must be a non-empty string.")
        if datatype != "BYTES" and datatype not in DTYPES:
            raise ApiError(400, f"{where}.datatype {datatype!r} is not a v2 datatype.")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                   and d >= 0 for d in shape)):
            raise ApiError(400, f"{where}.shape must be a list of non-negative integers.")
        size = int(np.prod(shape)) if shape else 1
        tparams = _dict(t.get("parameters"), f"{where}.parameters")
        nbytes = tparams.get("binary_data_size")
        if nbytes is not None:
            if not isinstance(nbytes, int) or nbytes < 0 or offset + nbytes > len(binary):
                raise ApiError(400, f"{where}.parameters.binary_data_size is {nbytes!r} but "
                                    f"only {len(binary) - offset} binary bytes are left.")
            raw = binary[offset:offset + nbytes]
            offset += nbytes
            value = (_bytes_from_binary(raw, size, where) if datatype == "BYTES"
                     else _numbers_from_binary(raw, datatype, size, where))
        else:
            if "data" not in t:
                raise ApiError(400, f"{where} has neither 'data' nor "
                                    "parameters.binary_data_size.")
            value = (_bytes_from_json(t["data"], size, where) if datatype == "BYTES"
                     else _numbers_from_json(t["data"], datatype, size, where))
        inputs[name] = value.reshape(shape) if datatype != "BYTES" else value
        datatypes[name] = datatype
    if offset != len(binary):
        raise ApiError(400, f"The body has {len(binary) - offset} binary bytes that no input's "
                            "binary_data_size accounts for.")
    outputs = None
    if "outputs" in doc:
        if not isinstance(doc["outputs"], list):
            raise ApiError(400, "'outputs' must be a list.")
        outputs = []
        for k, o in enumerate(doc["outputs"]):
            o = _dict(o, f"outputs[{k}]")
            if not isinstance(o.get("name"), str):
                raise ApiError(400, f"outputs[{k}].name must be a string.")
            op = _dict(o.get("parameters"), f"outputs[{k}].parameters")
            outputs.append((o["name"], bool(op.get("binary_data", False))))
    rid = doc.get("id")
    return V2Request(id=None if rid is None else str(rid), inputs=inputs, outputs=outputs,
                     binary_output=bool(params.get("binary_data_output", False)),
                     datatypes=datatypes)


def parse_request_values(header: bytes, binary: bytes) -> tuple[V2Request | None, int, str]:
    """:func:`parse_request` for a separate process: errors come back as values (an exception's
    pickling would lose its status), float64 from JSON as float32 (half the bytes to send)."""
    try:
        req = parse_request(header, binary)
    except ApiError as exc:
        return None, exc.status, exc.message
    for k, v in req.inputs.items():
        if v.dtype == np.float64:
            req.inputs[k] = v.astype(np.float32)
    return req, 200, ""


def encode_response(model: str, version: str, request_id: str | None, outputs: list[Output],
                    binary: set[str]) -> tuple[bytes, int | None]:
    """The response body and, when some output is binary, its JSON header's length."""
    tensors, blobs = [], []
    for o in outputs:
        entry: dict[str, Any] = {"name": o.name, "datatype": o.datatype,
                                 "shape": list(o.value.shape)}
        if o.name in binary:
            raw = (_bytes_to_binary(o.value) if o.datatype == "BYTES"
                   else np.ascontiguousarray(o.value, DTYPES[o.datatype]).tobytes())
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif o.datatype == "BYTES":
            entry["data"] = [v.decode("utf-8", "replace") for v in o.value.ravel()]
        else:
            entry["data"] = o.value.ravel().tolist()
        tensors.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": tensors}
    if request_id is not None:
        doc["id"] = request_id
    head = json.dumps(doc).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


# ----------------------------------------------------------------------------------- helpers

def _dict(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, f"{where} must be a JSON object.")
    return value


def _numbers_from_json(data: Any, datatype: str, size: int, where: str) -> np.ndarray:
    try:
        arr = np.asarray(data, dtype=np.float64 if datatype.startswith("FP") else None)
    except (TypeError, ValueError):
        raise ApiError(400, f"{where}.data must be a (flat or nested) list of numbers.") from None
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise ApiError(400, f"{where}.data must be a (flat or nested) list of numbers.")
    if arr.size != size:
        raise ApiError(400, f"{where}.data has {arr.size} values; its shape needs {size}.")
    return arr.ravel()


def _numbers_from_binary(raw: bytes, datatype: str, size: int, where: str) -> np.ndarray:
    dtype = np.dtype(DTYPES[datatype])
    if len(raw) != size * dtype.itemsize:
        raise ApiError(400, f"{where} has {len(raw)} binary bytes; its shape and {datatype} "
                            f"need {size * dtype.itemsize}.")
    return np.frombuffer(raw, dtype=dtype)


def _bytes_from_json(data: Any, size: int, where: str) -> np.ndarray:
    flat = data
    while isinstance(flat, list) and flat and isinstance(flat[0], list):
        flat = [x for row in flat for x in row]
    if not isinstance(flat, list) or not all(isinstance(x, str) for x in flat):
        raise ApiError(400, f"{where}.data must be a list of base64 strings (BYTES in JSON).")
    if len(flat) != size:
        raise ApiError(400, f"{where}.data has {len(flat)} elements; its shape needs {size}.")
    out = np.empty(size, dtype=object)
    for i, s in enumerate(flat):
        try:
            out[i] = base64.b64decode(s, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}.data[{i}] is not base64. BYTES elements in JSON must "
                                "be base64-encoded (or send them with the binary extension)."
                           ) from None
    return out


def _bytes_from_binary(raw: bytes, size: int, where: str) -> np.ndarray:
    out = np.empty(size, dtype=object)
    pos = 0
    for i in range(size):
        if pos + 4 > len(raw):
            raise ApiError(400, f"{where}: binary BYTES data ends before element {i}.")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise ApiError(400, f"{where}: binary BYTES element {i} says {n} bytes; fewer are "
                                "left.")
        out[i] = raw[pos + 4:pos + 4 + n]
        pos += 4 + n
    if pos != len(raw):
        raise ApiError(400, f"{where}: {len(raw) - pos} binary bytes after the last element.")
    return out


def _bytes_to_binary(values: np.ndarray) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values.ravel())
