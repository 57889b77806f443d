"""KServe's Python ModelServer (kserve 0.21) serving one ONNX file through onnxruntime, V2 REST
on 127.0.0.1, for `make bench`. Usage: python kserve_onnx.py --model_path F --model_name M
--http_port P --grpc_port G."""
import argparse

import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve import model_server


class OnnxModel(Model):
    def __init__(self, name, path):
        super().__init__(name)
        self.sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.ready = True

    def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        feeds = {i.name: i.as_numpy() for i in payload.inputs}
        names = [o.name for o in self.sess.get_outputs()]
        outs = self.sess.run(names, feeds)
        result = []
        for n, o in zip(names, outs):
            out = InferOutput(name=n, shape=list(o.shape), datatype="FP32" if o.dtype == np.float32 else "INT64")
            out.set_data_from_numpy(o, binary_data=False)
            result.append(out)
        return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=result)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model_path", required=True)
    args, _ = parser.parse_known_args()
    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, enable_grpc=False).start(
        [OnnxModel(args.model_name, args.model_path)])
