"""Serving: the runtime past one process.

`app.py` is `stexport serve` (Ray Serve: HTTP application, request parsing, path confinement, batching);
`oip.py` (the Open Inference Protocol's tensors), `oip_routes.py` (its REST and gRPC methods on the
deployment), `oip_grpc.py` (the gRPC service on Ray Serve's proxy), `metrics.py` (Prometheus) and `auth.py`
(bearer token) are its protocol, metrics and access control;
`ray_data.py` classifies corpora with Ray Data. Built on `stexport.runtime` and `stexport.bundle`.
"""
