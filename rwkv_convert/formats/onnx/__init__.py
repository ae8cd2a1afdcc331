"""ONNX: step and sequence graphs for every version (export.py, one graph module per version), running
exported files in onnxruntime (runtime.py, which never imports the exporter), and the registry entry
(format.py)."""
