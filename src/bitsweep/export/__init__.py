"""Export of quantized models for deployment: ONNX files checked in onnxruntime.

``onnx`` (QDQ graphs), ``onnx_qop`` (QOperator int8 written from the integer program),
``onnx_check`` (agreement with the integer-exact simulation, latency against FP32).
"""
