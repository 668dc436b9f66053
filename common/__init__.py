"""Plain-Python utilities below both the data pipeline and the models: errors, atomic writes, storage
(local paths and fsspec URLs), PNG grids. Nothing here imports torch, the pipeline or the models."""
