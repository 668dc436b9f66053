"""Serving: ONNX export and its publication, and the registry's writes (`versions`, `champion_store`, `promotion`,
`aliases`, `notes`).
Importing this package imports nothing heavy: the registry's modules stay torch-free, as the runtime they build on."""
