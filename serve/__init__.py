"""OpenAI-compatible HTTP serving of nugget2d: ``nugget2d serve`` (uvicorn, or Ray Serve with ``--ray``).

``app.create_app(ServerConfig(...))`` builds the FastAPI app; modules are imported on use so the
CLI's ``--help`` stays instant.
"""
