"""TensorRT engines for stexport bundles (installed as `stexport.trt_engines`).

record.py   what an engine was built for and whether it runs here (pure functions)
Runtime side (loads and runs engines):
trt.py      importing TensorRT and its one process-wide logger (shared by both sides)
record.py   what an engine was built for and whether it runs here (pure functions)
cache.py    engines, timing caches and their records inside a bundle; atomic, locked writes
refit.py    swapping a task's tensors into a refittable engine
cuda.py     device memory, pinned host memory and a stream via cuda-python or pycuda
runtime.py  TensorRTBackend, the `tensorrt` backend; reaches the build side only through
            `engine.ensure_engine` (a missing or stale engine is built on first use)
Build side:
build.py    ONNX → strongly typed network → serialized engine (the only module that builds with TensorRT)
engine.py   `ensure_engine` and what `stexport engine` and `stexport build --engine` call

Nothing here imports tensorrt at import time: `import stexport` works without it.
"""
