"""The model as parameters: ParamSpec and flat vectors, safetensors/ONNX files, on-device inference."""
