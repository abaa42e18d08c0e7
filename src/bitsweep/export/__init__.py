"""Export of quantized models for deployment: ONNX files checked in onnxruntime."""
