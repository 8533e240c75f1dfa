"""The Open Inference Protocol's gRPC service (`inference.GRPCInferenceService`) on Ray Serve's gRPC proxy.

tritonclient ships the service's generated code (grpc_service.proto: service_pb2, service_pb2_grpc). Ray Serve
2.60 serves a custom gRPC service given the import path of its `add_..._to_server` function
(`gRPCOptions(grpc_servicer_functions=[SERVICER])`): the proxy registers the service's methods and sends each
call to the deployment method of the same name (ServerLive, ModelInfer, … in oip_routes.OIPRoutes), so the
deployment class plays the part of a `GRPCInferenceServiceServicer` subclass, on the replica that holds the model
and its batches.

The proxy pickles requests and responses between processes; tritonclient's generated messages name their
module `grpc_service_pb2` (the .proto file's name), which is not importable as such, so importing this module
makes that name an alias of tritonclient's module (in the proxy, through SERVICER, and in each replica).
"""

from __future__ import annotations

import sys

from tritonclient.grpc import service_pb2, service_pb2_grpc

sys.modules.setdefault("grpc_service_pb2", service_pb2)

SERVICER = "stexport.serving.oip_grpc:add_servicer"


def add_servicer(servicer, server) -> None:
    """What Ray Serve's gRPC proxy calls to register the service on its server."""
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)


def limit_messages(max_bytes: int) -> None:
    """Cap the gRPC messages Ray Serve's proxy accepts (Ray's default: 2 GiB) at `max_bytes`, as an HTTP
    request's body is capped: Ray reads RAY_SERVE_GRPC_MAX_MESSAGE_SIZE from the environment of the cluster's
    processes, so this works only before this process starts a local cluster (not on a joined one)."""
    import os

    os.environ["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] = str(max_bytes)


def grpc_options(port: int):
    """Ray Serve's gRPCOptions for the service on `port` (Ray's proxy listens on every address)."""
    from ray.serve.config import gRPCOptions

    return gRPCOptions(port=port, grpc_servicer_functions=[SERVICER])


def running() -> tuple[int, list[str]] | None:
    """(port, servicer functions) of the gRPC proxy of the Ray Serve instance this process is connected to:
    Serve takes its gRPC options when it first starts on a cluster, so they may be another server's. None
    when they cannot be read (a private API of Ray Serve 2.x)."""
    try:
        import ray
        from ray.serve.context import _get_global_client

        config = ray.get(_get_global_client()._controller.get_grpc_config.remote())
    except Exception:  # noqa: BLE001 - a private API; what this call asked for is right whenever it started Serve
        return None
    return config.port, list(config.grpc_servicer_functions)


def check_running(port: int) -> None:
    """Warn when the Ray Serve instance this process joined keeps gRPC options of its own (`running`):
    another port, or no OIP service."""
    import logging

    found = running()
    if found is not None and (found[0] != port or SERVICER not in found[1]):
        logging.getLogger("stexport").warning(
            "Ray Serve already runs on this cluster with its gRPC proxy on port %d serving %s; --grpc-port %d does "
            "not apply", found[0], ", ".join(found[1]) or "no service", port)
