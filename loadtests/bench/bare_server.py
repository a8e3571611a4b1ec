"""The no-framework reference: a bare grpc.aio server running one ONNX model.

Open Inference Protocol ``ModelInfer`` only, raw tensors only, no validation, no
batching: the least a Python gRPC server can do per request. ``make bench`` compares
DeepServe with it.

    python loadtests/bench/bare_server.py MODEL.onnx MODEL_NAME PORT [--uvloop]

``--uvloop`` runs it on uvloop, the event loop Ray Serve gives its replicas (and so
DeepServe's gateway): the like-for-like reference for DeepServe.
"""

from __future__ import annotations

import asyncio
import sys

import grpc
import numpy as np
import onnxruntime as ort

from deepserve.proto import inference_pb2 as oip
from deepserve.proto import inference_pb2_grpc as oip_grpc

_NUMPY = {"FP32": np.float32, "INT64": np.int64}


class Bare(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(self, path: str, name: str):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.name = name
        self.outputs = [o.name for o in self.session.get_outputs()]

    async def ServerReady(self, request, context):
        return oip.ServerReadyResponse(ready=True)

    async def ModelInfer(self, request, context):
        feeds = {
            t.name: np.frombuffer(raw, _NUMPY[t.datatype]).reshape(tuple(t.shape))
            for t, raw in zip(request.inputs, request.raw_input_contents)
        }
        names = [o.name for o in request.outputs] or self.outputs  # the outputs asked for, or all
        results = self.session.run(names, feeds)
        response = oip.ModelInferResponse(model_name=self.name)
        for name, array in zip(names, results):
            response.outputs.add(name=name, datatype="FP32", shape=array.shape)
            response.raw_output_contents.append(array.tobytes())
        return response


async def main(path: str, name: str, port: int) -> None:
    server = grpc.aio.server()
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(Bare(path, name), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    if "--uvloop" in sys.argv:
        import uvloop

        uvloop.install()
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
