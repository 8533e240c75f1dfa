"""Serving: the runtime past one process.

`app.py` is `stexport serve` (Ray Serve: HTTP application, request parsing, path confinement, batching);
`ray_data.py` classifies corpora with Ray Data. Built on `stexport.runtime` and `stexport.bundle`.
"""
