"""An int8 copy of a set of unit vectors that shortlists each query's best candidates.

`FlatIndex` (mbc/runtime/index.py) scores only a shortlist exactly: the `count` best vectors by
this copy's integer inner product. The scan is one onnxruntime graph, built once per vector set:
MatMulInteger (the int8 kernels of onnxruntime's MLAS, the copy packed once when the session
starts), the vectors' scales, the excluded positions, TopK. Against the float32 BLAS product it
reads a quarter of the bytes and does the top-k in the same pass; the figures are in
docs/performance.md ("Against the measured bound").

Quantisation, chosen so that a query's shortlist never depends on the other queries of its batch:
- each query row on its own scale, int8 shifted to uint8 (zero point 128), so a Match ranks the
  same alone or in a micro-batch;
- each vector on its own scale, in 7 bits ([-63, 63]): on CPUs without VNNI, MLAS multiplies
  uint8 by int8 with an instruction that saturates pairs of products in 16 bits, and 255·63·2 fits
  where 255·127·2 would not (onnxruntime's documented `reduce_range`).

Needs the onnx extra (onnxruntime and onnx); without it `AVAILABLE` is False and `FlatIndex`
scores every vector.
"""

from __future__ import annotations

import numpy as np

try:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
except ImportError:  # the onnx extra is not installed
    ort = None

AVAILABLE = ort is not None
"""onnxruntime and onnx are installed."""

VECTOR_LEVELS = 63
"""Largest magnitude of a vector's int8 components (7 bits: see the module docstring)."""
QUERY_LEVELS = 127
"""Largest magnitude of a query's components, before the shift to uint8."""


class Int8Scan:
    """A shortlist of each query's best vectors by an int8 inner product (see the module docstring).

    Immutable: a changed vector set gets a new scan. Safe to call from several threads at once; a
    call runs on the calling thread."""

    def __init__(self, vectors: np.ndarray) -> None:
        """`vectors`: float32, one unit vector a row; at least one."""
        if not AVAILABLE:
            raise RuntimeError("the int8 scan needs onnxruntime and onnx (the onnx extra)")
        vectors = np.asarray(vectors, np.float32)
        self.count, self.dim = vectors.shape
        peak = np.maximum(np.abs(vectors).max(axis=1), np.float32(1e-12))
        codes = np.clip(np.rint(vectors * (VECTOR_LEVELS / peak)[:, None]), -VECTOR_LEVELS, VECTOR_LEVELS)
        self._session = _session(np.ascontiguousarray(codes.T.astype(np.int8)), (peak / VECTOR_LEVELS).astype(np.float32))
        self._nothing_excluded = np.zeros(self.count, np.float32)

    def shortlist(self, queries: np.ndarray, count: int, excluded: np.ndarray | None = None) -> np.ndarray:
        """Positions of the `count` best vectors of each query row (unordered), `excluded` (a
        boolean mask over the vectors) ranked last: they are returned only when fewer than `count`
        others are left, and the caller must drop them."""
        queries = np.asarray(queries, np.float32).reshape(-1, self.dim)
        peak = np.maximum(np.abs(queries).max(axis=1, keepdims=True), np.float32(1e-12))
        shifted = (np.rint(queries * (QUERY_LEVELS / peak)) + 128).astype(np.uint8)
        penalty = self._nothing_excluded
        if excluded is not None:
            penalty = np.where(excluded, np.float32(-np.inf), np.float32(0.0))
        count = max(1, min(count, self.count))
        (positions,) = self._session.run(None, {"queries": shifted, "penalty": penalty, "count": np.array([count], np.int64)})
        return positions


def _session(codes: np.ndarray, scales: np.ndarray):
    """The scan's graph over `codes` (dim × n, int8) with the vectors' `scales` (n), on one thread."""
    dim, n = codes.shape
    nodes = [
        helper.make_node("MatMulInteger", ["queries", "codes", "query_zero"], ["dots"]),
        helper.make_node("Cast", ["dots"], ["dots_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["dots_float", "scales"], ["scores"]),
        helper.make_node("Add", ["scores", "penalty"], ["ranked"]),
        helper.make_node("TopK", ["ranked", "count"], ["best", "positions"], sorted=0),
    ]
    graph = helper.make_graph(
        nodes,
        "int8_scan",
        [
            helper.make_tensor_value_info("queries", TensorProto.UINT8, ["queries", dim]),
            helper.make_tensor_value_info("penalty", TensorProto.FLOAT, [n]),
            helper.make_tensor_value_info("count", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("positions", TensorProto.INT64, ["queries", "count"])],
        [
            numpy_helper.from_array(codes, "codes"),
            numpy_helper.from_array(scales, "scales"),
            numpy_helper.from_array(np.array(128, np.uint8), "query_zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # on the caller's thread: the encoder's threads have the cores
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
