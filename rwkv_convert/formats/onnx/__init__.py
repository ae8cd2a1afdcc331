"""ONNX export (step and sequence graphs for every version) and running exported files in onnxruntime."""
