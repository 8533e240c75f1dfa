"""TensorRT engines for stexport bundles (installed as `stexport.trt_engines`).

record.py   what an engine was built for and whether it runs here (pure functions)
cache.py    engines, timing caches and their records inside a bundle; atomic, locked writes
build.py    ONNX → strongly typed network → serialized engine (the only module that builds with TensorRT)
cuda.py     device memory, pinned host memory and a stream via cuda-python or pycuda
runtime.py  TensorRTBackend, the `tensorrt` backend
engine.py   what `stexport engine` and `stexport build --engine` call

Nothing here imports tensorrt at import time: `import stexport` works without it.
"""
