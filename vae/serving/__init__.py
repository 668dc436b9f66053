"""Serving: ONNX export and its publication, the registry and the torch-free runtime. Importing this package
imports nothing heavy: `runtime` and `registry` stay torch-free."""
