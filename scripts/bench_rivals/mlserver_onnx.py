"""An MLServer 1.7 runtime serving one ONNX file through onnxruntime, for `make bench`
(`mlserver start DIR` with this module on PYTHONPATH; the model file is `parameters.uri`)."""
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        self.sess = ort.InferenceSession(self.settings.parameters.uri, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.sess.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        outs = self.sess.run(self.names, feeds)
        return InferenceResponse(model_name=self.name, id=payload.id,
                                 outputs=[NumpyCodec.encode_output(n, o) for n, o in zip(self.names, outs)])
