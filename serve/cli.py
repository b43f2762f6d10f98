"""``nugget2d serve``: its flags, and starting the app under uvicorn or Ray Serve.

Only argparse is imported at module level so ``nugget2d --help`` stays instant.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from nugget2d.runtime.cli_options import add_cache_arguments, add_model_arguments, cache_config

#: Where each key is read from when neither its flag nor its file flag is given.
KEY_ENVIRONMENT = {"api_key": "NUGGET2D_API_KEY", "metrics_key": "NUGGET2D_METRICS_KEY"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of ``nugget2d serve``."""
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=8000)
    add_model_arguments(parser)
    parser.add_argument("--served-model-name", default="nugget2d", help="the model name clients send")
    keys = parser.add_argument_group(
        "keys",
        "With an API key every path but a bare GET /health needs 'Authorization: Bearer KEY'. A key on the command "
        "line shows in the process list: prefer a file or the environment (NUGGET2D_API_KEY, NUGGET2D_METRICS_KEY).",
    )
    keys.add_argument("--api-key", default=None, help="the API key itself (visible to other users: see above)")
    keys.add_argument("--api-key-file", type=Path, default=None, help="read the API key from this file")
    keys.add_argument("--metrics-key", default=None, help="a key that opens only /metrics and /health's details")
    keys.add_argument("--metrics-key-file", type=Path, default=None, help="read the metrics key from this file")
    cache = add_cache_arguments(parser, "cache (documents and long prompts)", exclude=("positions",))
    cache.add_argument(
        "--compress-threshold",
        type=int,
        default=1024,
        help="a prompt longer than this many tokens has all but its last this-many compressed into nuggets",
    )
    cache.add_argument("--documents-dir", type=Path, default=None, help="where documents persist (default: user cache)")
    cache.add_argument("--document-memory-mb", type=float, default=1024, help="document caches kept in memory")
    cache.add_argument("--max-documents", type=int, default=None, help="documents stored at most (then 507)")
    cache.add_argument(
        "--documents-quota-mb", type=float, default=None, help="disk the stored documents may use (then 507, or 413)"
    )
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-tokens-cap", type=int, default=512, help="largest max_tokens a request may ask for")
    limits.add_argument("--max-body-mb", type=float, default=16, help="largest request body")
    limits.add_argument("--timeout", type=float, default=300, help="seconds a request may wait and run")
    limits.add_argument("--slots", type=int, default=8, help="requests the model worker interleaves")
    limits.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="answers decoded together in one forward pass per token, at most (1: batching off, each in turn)",
    )
    limits.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot (then 429)")
    limits.add_argument(
        "--max-lookback",
        type=int,
        default=1024,
        help="largest lookback (tokens read back before an answer) a request may ask for (0: look-back off)",
    )
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
        api_key=_key(args, "api_key"),
        metrics_key=_key(args, "metrics_key"),
        stream=cache_config(args),
        compress_threshold=args.compress_threshold,
        max_tokens_cap=args.max_tokens_cap,
        max_body_bytes=int(args.max_body_mb * 2**20),
        timeout_s=args.timeout,
        slots=args.slots,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_lookback=args.max_lookback,
        documents_dir=args.documents_dir or default_documents_dir(),
        document_memory_bytes=int(args.document_memory_mb * 2**20),
        max_documents=args.max_documents,
        documents_quota_bytes=None if args.documents_quota_mb is None else int(args.documents_quota_mb * 2**20),
    )


def _key(args: argparse.Namespace, name: str) -> str | None:
    """A key from its flag, else its file (trailing whitespace dropped), else its environment variable."""
    flag, file = getattr(args, name), getattr(args, f"{name}_file")
    option = "--" + name.replace("_", "-")
    if flag is not None and file is not None:
        raise ValueError(f"give {option} or {option}-file, not both")
    if file is not None:
        try:
            return file.read_text().rstrip()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read {option}-file {file}: {err}") from err
    return flag if flag is not None else os.environ.get(KEY_ENVIRONMENT[name])


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; returns the exit status."""
    config = config_from(args)
    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    if args.ray:
        from .ray_serve import serve_on_ray

        return serve_on_ray(config, args.replicas, args.address, args.host, args.port, args.replica_cpus)
    from .app import create_app, load_model

    app = create_app(config, loaded=load_model(config))
    return _serve_uvicorn(app, args.host, args.port, args.log_level)


def _serve_uvicorn(app, host: str, port: int, log_level: str) -> int:
    """Run ``app`` under uvicorn until Ctrl-C or SIGTERM. The signal drains the model worker at
    once: requests still waiting for it get a 503 while running ones have the grace period to end."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.engine.drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    server = DrainingServer(config)
    server.run()
    return 0 if server.started else 3
