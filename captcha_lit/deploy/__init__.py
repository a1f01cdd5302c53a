"""Deployment: ONNX export, the torch-free runtime and the HTTP service."""
