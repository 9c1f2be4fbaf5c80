"""The jobs that start a server: `serve` (a local model over the Open Inference Protocol) and
`proxy` (the smoothed classifier as an HTTP service answering with certificates)."""

from __future__ import annotations

import asyncio
import functools
from importlib.metadata import version
from typing import Any

from ..adapters import LabelMap, open_blackbox
from ..cluster import shared
from ..data import parse_size
from ..errors import UsageError
from ..frontends.base import read_config
from ..httpserver import HttpServer
from ..options import CertifyOptions, ImageOptions, ProxyOptions, ServeOptions, SmoothingOptions
from ..proxy import serve_proxy
from ..proxy.app import create_app
from ..proxy.replicas import RayProxy, SharedQuotas
from ..proxy.service import Quotas, Service
from ..rayjoin import ray_module
from ..serve import InferenceServer
from ..smooth import resolve_device
from .access import client_keys, server_key, warn_if_exposed
from .assembly import open_smoothed


def serve(options: ServeOptions) -> InferenceServer:
    """A server for the local model, listening (not yet serving: `serve_forever`)."""
    api_key = server_key(options.api_key_env)
    needs = f"the key in ${options.api_key_env}" if api_key else None
    warn_if_exposed(options.host, "the model", needs, "--api-key-env NAME")
    model = open_blackbox(options.endpoint, device=resolve_device(options.device))
    try:
        return InferenceServer(
            model,  # type: ignore[arg-type]
            name=options.name,
            host=options.host,
            port=options.port,
            delay=options.delay,
            max_request_bytes=options.max_request_bytes,
            client_timeout=options.client_timeout,
            max_connections=options.max_connections,
            max_bodies=options.max_bodies,
            api_key=api_key,
        )
    except OSError as e:
        raise UsageError(
            f"cannot listen on {options.host}:{options.port}: {e.strerror or e}"
        ) from e


def proxy(
    options: SmoothingOptions,
    plan: CertifyOptions = CertifyOptions(),
    imaging: ImageOptions = ImageOptions(),
    settings: ProxyOptions = ProxyOptions(),
) -> HttpServer | RayProxy:
    """`bbsmooth proxy`: the smoothed classifier of `options` as an HTTP service answering
    with `plan`'s certificates: bound to its socket (not yet serving: `run`), or with
    --ray, deployed on Ray Serve (serving until `run` returns)."""
    keys = client_keys(settings)
    needs = "a client key" if keys else None
    warn_if_exposed(settings.host, "the certified model", needs, "--client-keys-file")
    shape = _proxy_shape(options, imaging)
    if settings.ray is not None:
        # opened once here first: a wrong endpoint or front end is one line now, not a
        # replica's traceback in Ray's logs
        asyncio.run(open_smoothed(options, shape).aclose())
        build = functools.partial(proxy_app, options, plan, imaging, settings, keys, shape)
        return RayProxy(build, settings, (options.max_queries, options.wire.rps))
    return serve_proxy(proxy_app(options, plan, imaging, settings, keys, shape), settings)


def proxy_app(
    options: SmoothingOptions,
    plan: CertifyOptions,
    imaging: ImageOptions,
    settings: ProxyOptions,
    keys: list[str],
    shape: tuple[int, int, int],
    limits_name: str | None = None,
) -> Any:
    """The proxy's ASGI app, its smoothed classifier opened; with `limits_name` (a Ray Serve
    replica), the budget, rate and quotas are that actor's (proxy.replicas.ProxyLimits),
    shared by every replica."""
    smoothed = open_smoothed(options, shape)
    quotas: Any = Quotas(settings.quota, settings.quota_period)
    if limits_name is not None:
        smoothed = shared(smoothed, limits_name, options.wire.rps is not None)
        quotas = SharedQuotas(ray_module().get_actor(limits_name))
    classes = None
    if options.wire.labels is not None:
        classes = list(LabelMap.load(str(options.wire.labels)).classes) or None
    service = Service(smoothed, plan, quotas, settings.deadline, classes)
    info = {"endpoint": options.endpoint.shown, "version": version("blackbox_smooth")}
    return create_app(service, settings, imaging, shape, keys, info)


def _proxy_shape(options: SmoothingOptions, imaging: ImageOptions) -> tuple[int, int, int]:
    """The (C, H, W) every image of the proxy becomes: the front end's, else --size with one
    channel (--grayscale) or three. Fixed, so that what a request can cost is bounded."""
    size = parse_size(imaging.size)
    if options.frontend is not None:
        config = read_config(options.frontend)
        return (config.channels, config.height, config.width)
    if size is None:
        raise UsageError(
            "bbsmooth proxy needs --size HxW, the model's input size (every image is resized "
            "to it, which bounds what a request costs), or a --frontend"
        )
    return (1 if imaging.grayscale else 3, *size)
