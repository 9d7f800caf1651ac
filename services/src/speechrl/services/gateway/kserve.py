"""The KServe v2 / Triton inference protocol over HTTP: request parsing and response tensors.

A request is JSON `{"id"?, "parameters"?, "inputs": [{"name", "shape", "datatype", "data"}],
"outputs"?: [{"name"}]}`; `data` may be flat or nested row-major, and BYTES elements are strings.
Triton's binary-tensor extension is read too (what `tritonclient.http` sends by default): the
`Inference-Header-Content-Length` header gives the JSON header's size, and each input with
`parameters.binary_data_size` takes that many raw bytes after it, in order (BYTES elements as a
4-byte little-endian length + bytes). Replies follow the same extension when asked: an output
requested with `parameters.binary_data: true` (or every output, with the request's
`parameters.binary_data_output: true`) is sent as raw bytes after the JSON header, which names its
`binary_data_size`; the reply then carries `Inference-Header-Content-Length`. Otherwise replies are
JSON tensors.

>>> request, tensors = parse_infer_request(b'{"inputs": [{"name": "TOKENS", "shape": [1, 3], '
...     b'"datatype": "INT32", "data": [[5, 6, 7]]}]}', None)
>>> tensors["TOKENS"].tolist()
[[5, 6, 7]]
>>> output_tensor("REWARDS", "FP32", np.array([[0.5]], np.float32))
{'name': 'REWARDS', 'datatype': 'FP32', 'shape': [1, 1], 'data': [0.5]}
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

NUMERIC_DTYPES: dict[str, str] = {
    "BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1", "INT16": "<i2",
    "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}
DATATYPES = frozenset(NUMERIC_DTYPES) | {"BYTES"}


class V2Error(Exception):
    """A request the v2 routes refuse: its HTTP status and the protocol's `{"error": message}` body."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class InferInput(BaseModel):
    """One input tensor."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(examples=["TOKENS"])
    shape: list[int] = Field(examples=[[1, 3]])
    datatype: str = Field(examples=["INT32"])
    parameters: dict[str, Any] | None = None
    data: Any = Field(default=None, description="Row-major values, flat or nested; BYTES as strings.")


class RequestedOutput(BaseModel):
    """An output the client wants; none listed means all of the model's outputs."""

    model_config = ConfigDict(extra="allow")

    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    """A v2 inference request."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "inputs": [{"name": "TOKENS", "shape": [1, 3], "datatype": "INT32", "data": [[101, 57, 3000]]},
                   {"name": "TOKEN_LENS", "shape": [1, 1], "datatype": "INT32", "data": [[3]]},
                   {"name": "GT_TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["hello world"]}]}]})

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInput] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, (list, tuple)):
        return [x for item in data for x in _flatten(item)]
    return [data]


def _bytes_elements(raw: bytes, name: str) -> list[bytes]:
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise V2Error(400, f"input {name}: truncated BYTES element length at byte {at}")
        size = int.from_bytes(raw[at:at + 4], "little")
        at += 4
        if at + size > len(raw):
            raise V2Error(400, f"input {name}: BYTES element of {size} bytes runs past the binary data")
        out.append(raw[at:at + size])
        at += size
    return out


def _tensor(spec: InferInput, binary: bytes | None) -> np.ndarray:
    if spec.datatype not in DATATYPES:
        raise V2Error(400, f"input {spec.name}: unsupported datatype {spec.datatype!r}; use one of {sorted(DATATYPES)}")
    if any(d < 0 for d in spec.shape):
        raise V2Error(400, f"input {spec.name}: shape {spec.shape} has a negative dimension")
    count = math.prod(spec.shape)
    if binary is not None:
        if spec.datatype == "BYTES":
            values: Any = _bytes_elements(binary, spec.name)
        else:
            dtype = np.dtype(NUMERIC_DTYPES[spec.datatype])
            if len(binary) != count * dtype.itemsize:
                raise V2Error(400, f"input {spec.name}: {len(binary)} binary bytes for shape {spec.shape} of {spec.datatype}")
            return np.frombuffer(binary, dtype=dtype).reshape(spec.shape)
    elif spec.data is None:
        raise V2Error(400, f"input {spec.name}: no data (give 'data' or binary_data_size)")
    else:
        values = _flatten(spec.data)
    if len(values) != count:
        raise V2Error(400, f"input {spec.name}: {len(values)} values for shape {spec.shape} ({count} expected)")
    if spec.datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = values
        return array.reshape(spec.shape)
    try:
        return np.asarray(values, dtype=np.dtype(NUMERIC_DTYPES[spec.datatype])).reshape(spec.shape)
    except (TypeError, ValueError) as exc:
        raise V2Error(400, f"input {spec.name}: data is not {spec.datatype} ({exc})") from None


def parse_infer_request(body: bytes, header_length: int | None) -> tuple[InferRequest, dict[str, np.ndarray]]:
    """The request and its input tensors by name; V2Error(400) naming what is wrong."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise V2Error(400, f"Inference-Header-Content-Length {header_length} does not fit a body of {len(body)} bytes")
    header, rest = (body[:header_length], body[header_length:]) if header_length is not None else (body, b"")
    try:
        request = InferRequest.model_validate(json.loads(header))
    except ValueError as exc:  # json.JSONDecodeError and pydantic's ValidationError are both ValueErrors
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()) \
            if isinstance(exc, ValidationError) else str(exc)
        raise V2Error(400, f"malformed inference request: {detail}") from None
    tensors: dict[str, np.ndarray] = {}
    at = 0
    for spec in request.inputs:
        if spec.name in tensors:
            raise V2Error(400, f"input {spec.name} given twice")
        size = (spec.parameters or {}).get("binary_data_size")
        binary = None
        if size is not None:
            if header_length is None or at + int(size) > len(rest):
                raise V2Error(400, f"input {spec.name}: binary_data_size {size} without that much binary data")
            binary, at = rest[at:at + int(size)], at + int(size)
        tensors[spec.name] = _tensor(spec, binary)
    return request, tensors


def wants_binary(request: InferRequest, output: str) -> bool:
    """Whether the client asked for this output as raw bytes (Triton's binary-tensor extension)."""
    default = bool((request.parameters or {}).get("binary_data_output", False))
    for requested in request.outputs or []:
        if requested.name == output and requested.parameters and "binary_data" in requested.parameters:
            return bool(requested.parameters["binary_data"])
    return default


def tensor_bytes(datatype: str, array: np.ndarray) -> bytes:
    """An output's raw bytes, row-major: numbers little-endian, BOOL one byte, BYTES a 4-byte length + bytes each."""
    flat = array.reshape(-1)
    if datatype == "BYTES":
        parts = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in flat]
        return b"".join(len(p).to_bytes(4, "little") + p for p in parts)
    return np.ascontiguousarray(flat, dtype=NUMERIC_DTYPES[datatype]).tobytes()


def binary_reply(header: dict[str, Any], raw: list[bytes]) -> tuple[bytes, int]:
    """The body of a reply with binary outputs (JSON header, then each output's bytes in order) and the
    header's length, for Inference-Header-Content-Length."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + b"".join(raw), len(head)


def output_tensor(name: str, datatype: str, array: np.ndarray) -> dict[str, Any]:
    """One output tensor as JSON: flat row-major data, BYTES as UTF-8 strings."""
    flat = array.reshape(-1)
    if datatype == "BYTES":
        data: list[Any] = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    elif datatype == "BOOL":
        data = [bool(v) for v in flat]
    elif datatype.startswith("FP"):
        data = [float(v) for v in flat]
    else:
        data = [int(v) for v in flat]
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}
