"""``nugget2d serve --ray``: the same FastAPI app behind Ray Serve, ``replicas`` copies of the model."""

from __future__ import annotations

import signal
import sys
import time

from .config import ServerConfig


def serve_on_ray(
    config: ServerConfig, replicas: int, address: str | None, host: str, port: int, replica_cpus: float = 1.0
) -> int:
    """Deploy on the Ray cluster at ``address`` (a new local one when None; ``auto`` joins the one
    ``ray start`` made) and block until interrupted (Ctrl-C or SIGTERM), then take it down."""
    import ray
    from ray import serve

    def build_app():
        from .app import create_app

        return create_app(config)

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus})
    @serve.ingress(build_app)
    class Nugget2DServer:
        """One replica: the app, with its own model worker."""

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ray.init(address=address or "local", include_dashboard=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(Nugget2DServer.bind(), name="nugget2d", route_prefix="/", blocking=False)
        print(f"nugget2d: serving on http://{host}:{port} with {replicas} Ray Serve replicas", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
