"""A block of a node's vectors as 4-bit codes in an ONNX Runtime session of its own: half the bytes
of the 8-bit scan's codes read per query.

ONNX Runtime's `MatMulNBits` (4 bits a coordinate, a scale per group of up to 128 coordinates, zero
point 8; int8 arithmetic with `accuracy_level` 4) packs its weights once when they are a constant of
the session: 1.2 ms for 50,000 rows after the node sat idle, against 2.3 for MatMulInteger over
their 8-bit codes (docs/benchmarks.md). Given as an input it packs them again at every call (80 ms
for 52,000 rows). So a block gets its 4-bit scan only once it has stopped changing
(node/node_vectors.py: built on a thread, about 0.1 s for a node's 52,000 rows), and the model,
whose row count is an attribute, is written here for each block: the lean install has no `onnx`
package (tests/test_node_index.py checks these bytes with it).

The 4-bit scores only shortlist: node/node_vectors.py reads the shortlisted rows' 8-bit codes again,
and every candidate is scored on its exact cosine.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

GROUPS = (128, 64, 32, 16)  # coordinates per scale: the largest that divides the dimension (fewest bytes)
_FLOAT, _UINT8 = 1, 2  # onnx.TensorProto data types


class FourBitScan:
    """Scores of a block's rows for a float32 query: (codes - 8) * scale, summed per row."""

    def __init__(self, codes: np.ndarray, scales: np.ndarray) -> None:
        """From the block's 8-bit codes (uint8, code + 128) and their row scales."""
        rows, dimension = codes.shape
        group = group_for(dimension)
        assert group is not None, dimension
        packed, group_scales = pack(codes, scales, group)
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1  # a node's one store thread
        self.session = ort.InferenceSession(model_bytes(rows, dimension, group, packed, group_scales), options,
                                            providers=["CPUExecutionProvider"])
        self.rows = rows
        self.nbytes = 2 * (packed.nbytes + group_scales.nbytes)  # ONNX Runtime keeps the constants and their packed copy

    def scores(self, query: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"query": query.reshape(1, -1)})[0][0]


def pack(codes: np.ndarray, scales: np.ndarray, group: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """4-bit codes, two a byte (low nibble first), and a float32 scale per `group` coordinates of each
    row, of 8-bit codes with a scale per row; `chunk` rows at a time, so the float temporaries stay
    small (large ones freed on a thread of its own would stay in its malloc arena)."""
    rows, dimension = codes.shape
    packed = np.empty((rows, dimension // group, group // 2), dtype=np.uint8)
    group_scales = np.empty((rows, dimension // group), dtype=np.float32)
    for start in range(0, rows, chunk):
        part = slice(start, start + chunk)
        values = ((codes[part].astype(np.float32) - 128.0) * scales[part, None]).reshape(-1, dimension // group, group)
        most = np.abs(values).max(axis=2) / 7.0
        most[most == 0] = 1.0
        fours = (np.clip(np.rint(values / most[..., None]), -7, 7) + 8).astype(np.uint8)
        packed[part] = fours[..., 0::2] | (fours[..., 1::2] << 4)
        group_scales[part] = most
    return packed, group_scales.reshape(-1)


def group_for(dimension: int) -> int | None:
    """Coordinates per scale for vectors of `dimension`; None: no 4-bit scan (MatMulNBits' blocks
    are powers of two from 16)."""
    return next((g for g in GROUPS if dimension % g == 0), None)


# ---- the model, written as protobuf (onnx.proto's field numbers) -----------------------------------

def model_bytes(rows: int, dimension: int, group: int, packed: np.ndarray, group_scales: np.ndarray) -> bytes:
    """One MatMulNBits node: scores[1, rows] = query[1, dimension] x the packed rows, which are constants."""
    node = (_strings(1, "query", "codes", "scales") + _strings(2, "scores") + _string(4, "MatMulNBits")
            + _string(7, "com.microsoft")
            + b"".join(_message(5, _string(1, name) + _field(3, value) + _field(20, 2))  # type INT
                       for name, value in (("K", dimension), ("N", rows), ("bits", 4), ("block_size", group),
                                           ("accuracy_level", 4))))
    graph = (_message(1, node) + _string(2, "tellodb_4bit")
             + _message(5, _tensor("codes", packed.shape, _UINT8, packed))
             + _message(5, _tensor("scales", group_scales.shape, _FLOAT, group_scales))
             + _message(11, _value("query", _FLOAT, (1, dimension)))
             + _message(12, _value("scores", _FLOAT, (1, rows))))
    return (_field(1, 8) + _string(2, "tellodb") + _message(7, graph)  # IR version 8
            + _message(8, _string(1, "") + _field(2, 13)) + _message(8, _string(1, "com.microsoft") + _field(2, 1)))


def _tensor(name: str, shape: tuple[int, ...], data_type: int, array: np.ndarray) -> bytes:
    return (b"".join(_field(1, d) for d in shape) + _field(2, data_type) + _string(8, name)
            + _bytes(9, np.ascontiguousarray(array).tobytes()))


def _value(name: str, elem_type: int, shape: tuple[int, ...]) -> bytes:
    dims = b"".join(_message(1, _field(1, d)) for d in shape)
    return _string(1, name) + _message(2, _message(1, _field(1, elem_type) + _message(2, dims)))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _bytes(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _string(number: int, text: str) -> bytes:
    return _bytes(number, text.encode())


def _strings(number: int, *texts: str) -> bytes:
    return b"".join(_string(number, t) for t in texts)


def _message(number: int, body: bytes) -> bytes:
    return _bytes(number, body)
