"""The REST service: answers with sources, an OpenAI-compatible endpoint, dynamic batching, a web page.

`create_app` takes ready Answerers (tests use tiny models) or a loader that builds them in the
background (`aimlqa serve`), so the server answers `/healthz` while a model is still loading.
Imported lazily: every `aimlqa` command mounts `server.cli`, and only `serve` needs FastAPI.
"""

__all__ = ["ServerConfig", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from server.app import create_app

        return create_app
    if name == "ServerConfig":
        from server.config import ServerConfig

        return ServerConfig
    raise AttributeError(f"module 'server' has no attribute {name!r}")
