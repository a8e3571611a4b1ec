"""The peer: KServe's ModelServer serving one ONNX model through ONNX Runtime.

Runs in its own virtual environment (``make bench`` creates ``.venv-kserve``), since
KServe's dependencies do not sit well beside Ray's. Open Inference Protocol over gRPC on
PORT; HTTP on PORT+1.

    .venv-kserve/bin/python loadtests/bench/kserve_server.py MODEL.onnx MODEL_NAME PORT
"""

from __future__ import annotations

import sys

import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


class OnnxModel(Model):
    def __init__(self, name: str, path: str):
        super().__init__(name)
        self.path = path
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers=None) -> InferResponse:
        feeds = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
        # The outputs the request asked for (all when it names none), as Triton answers.
        names = [o.name for o in getattr(payload, "request_outputs", None) or []] or self.output_names
        outputs = []
        for name, array in zip(names, self.session.run(names, feeds)):
            out = InferOutput(name=name, shape=list(array.shape), datatype="FP32")
            out.set_data_from_numpy(array, binary_data=True)
            outputs.append(out)
        return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=outputs,
                             use_binary_outputs=True)


if __name__ == "__main__":
    path, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ModelServer(grpc_port=port, http_port=port + 1, workers=1, enable_latency_logging=False).start(
        [OnnxModel(name, path)]
    )
