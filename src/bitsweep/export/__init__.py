"""Export of quantized models: ONNX QDQ files checked in onnxruntime."""
