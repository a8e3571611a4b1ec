"""DeepServe: ONNX models served by Ray Serve over gRPC.

The serving side (this package) needs no torch; model families live in
:mod:`deepserve.models` and are imported only by ``deepserve build``.
"""

__version__ = "0.1.0"
