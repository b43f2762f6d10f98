"""``nugget2d serve``: its flags, and starting the app under uvicorn or Ray Serve.

Only argparse is imported at module level so ``nugget2d --help`` stays instant.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nugget2d.runtime.cli_options import add_cache_arguments, add_model_arguments, stream_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of ``nugget2d serve``."""
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=8000)
    add_model_arguments(parser)
    parser.add_argument("--served-model-name", default="nugget2d", help="the model name clients send")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ endpoints")
    cache = add_cache_arguments(parser, "cache (documents and long prompts)", positions=False)
    cache.add_argument(
        "--compress-threshold",
        type=int,
        default=1024,
        help="a prompt longer than this many tokens has all but its last this-many compressed into nuggets",
    )
    cache.add_argument("--documents-dir", type=Path, default=None, help="where documents persist (default: user cache)")
    cache.add_argument("--document-memory-mb", type=float, default=1024, help="document caches kept in memory")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-tokens-cap", type=int, default=512, help="largest max_tokens a request may ask for")
    limits.add_argument("--max-body-mb", type=float, default=16, help="largest request body")
    limits.add_argument("--timeout", type=float, default=300, help="seconds a request may wait and run")
    limits.add_argument("--slots", type=int, default=8, help="requests the model worker interleaves")
    limits.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot (then 429)")
    ray = parser.add_argument_group("Ray Serve")
    ray.add_argument("--ray", action="store_true", help="deploy the app with Ray Serve instead of one uvicorn process")
    ray.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (each loads the model)")
    ray.add_argument(
        "--address", default=None, help="Ray cluster address, or 'auto' for the running one (default: a new local one)"
    )
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs each replica reserves")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def config_from(args: argparse.Namespace):
    """The :class:`ServerConfig` the flags describe (``ValueError`` if they contradict)."""
    from .config import ServerConfig, default_documents_dir

    return ServerConfig(
        model=args.model,
        adapter=args.adapter,
        attention=args.attention,
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        stream=stream_settings(args),
        compress_threshold=args.compress_threshold,
        max_tokens_cap=args.max_tokens_cap,
        max_body_bytes=int(args.max_body_mb * 2**20),
        timeout_s=args.timeout,
        slots=args.slots,
        max_queue=args.max_queue,
        documents_dir=args.documents_dir or default_documents_dir(),
        document_memory_bytes=int(args.document_memory_mb * 2**20),
    )


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; returns the exit status."""
    config = config_from(args)
    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    if args.ray:
        from .ray_serve import serve_on_ray

        return serve_on_ray(config, args.replicas, args.address, args.host, args.port, args.replica_cpus)
    import uvicorn

    from .app import create_app, load_model

    app = create_app(config, loaded=load_model(config))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
