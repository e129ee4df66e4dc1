"""`aimlqa serve`: the REST service on registered models and an index."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from aimlqa.options import mode_option


def serve(
    model: Optional[list[str]] = typer.Option(None, "--model", "-m", show_default="gemma-270m-aiml-cpp (llama.cpp), gemma-270m-aiml, gemma-270m",
                                              help="A registered model to serve (repeat for several; the first is the default). Models on one base share its weights"),
    index: Optional[Path] = typer.Option(None, help="Index dir (default: $AIMLQA_HOME/indexes/course); without one, answers are not grounded"),
    host: str = typer.Option("127.0.0.1", help="Address to listen on"),
    port: int = typer.Option(8000, help="Port to listen on"),
    mode: str = mode_option(),
    max_batch_size: int = typer.Option(8, min=1, max=256, help="Questions per generate call"),
    max_wait_ms: float = typer.Option(10.0, min=0, help="How long a request waits for others to batch with"),
    queue_size: int = typer.Option(256, min=1, help="Requests waiting per model before 503 + Retry-After"),
    request_timeout: float = typer.Option(120.0, min=0.1, help="Seconds a request may take, queueing included, before 504"),
    max_question_tokens: int = typer.Option(512, min=1, help="Longest question, in the model's tokens"),
    adapters_dir: Optional[Path] = typer.Option(None, help="Where POST /v1/load_lora_adapter may load adapters from (default: $AIMLQA_HOME/finetuned)"),
    log_level: str = typer.Option("info", help="debug | info | warning | error"),
    ray: bool = typer.Option(False, "--ray", help="Serve on Ray Serve: the same app as the ingress, each model group a replicated deployment (needs .[scale])"),
    replicas: int = typer.Option(1, min=1, help="--ray: replicas of each model group"),
    autoscale: Optional[str] = typer.Option(None, metavar="MIN:MAX", help="--ray: autoscale each model group between MIN and MAX replicas instead"),
    cpus_per_replica: float = typer.Option(1.0, min=0.1, help="--ray: CPUs each model replica reserves (a vLLM replica also takes its tensor_parallel_size GPUs)"),
    index_url: Optional[str] = typer.Option(None, help="--ray: a packed index (.tar.gz) every replica fetches once (http(s)://, file://), instead of --index on shared storage"),
    ray_address: Optional[str] = typer.Option(None, help="--ray: a running Ray cluster (ray://host:10001 or auto); default: start one on this machine"),
    detach: bool = typer.Option(False, "--detach", help="--ray with --ray-address: deploy, or roll the running deployment over to this one, and return"),
):
    """Serve answers over REST (and an OpenAI-compatible endpoint, and a web page). API keys: AIMLQA_API_KEYS=k1,k2."""
    import uvicorn

    from aimlqa import settings
    from aimlqa.settings import UserError
    from rag.registry import get_spec
    from server.app import create_app
    from server.config import ServerConfig

    if not ray and (index_url or detach or ray_address or autoscale or replicas != 1):
        raise UserError("--replicas, --autoscale, --index-url, --ray-address and --detach are for --ray (Ray Serve); add --ray, or leave them out")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    specs = [get_spec(name) for name in dict.fromkeys(model or settings.default_models())]  # unknown names fail here, before anything loads
    needs_index = index is not None or any(s.backend == "retrieval" for s in specs)
    index_dir = index or settings.default_index_dir()
    if index_url and index is not None:
        raise UserError("give --index (a path every node sees) or --index-url (a packed index fetched once per node), not both")
    if needs_index and not index_url and not (index_dir / "manifest.json").is_file():
        raise UserError(f"no index at {index_dir}; build one with `make index` or `aimlqa index build`")
    if not needs_index and not index_url and not (index_dir / "manifest.json").is_file():
        logging.getLogger("aimlqa.server").warning("no index at %s: answers will not be grounded", index_dir)

    def load() -> dict:
        from rag.cli import open_retriever
        from rag.pool import load_answerers

        return load_answerers(specs, open_retriever(index, required=needs_index), mode)

    failure: list[str] = []
    config = ServerConfig(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, queue_size=queue_size,
                          request_timeout_s=request_timeout, max_question_tokens=max_question_tokens, default_model=specs[0].name,
                          adapters_root=adapters_dir)

    def stop_on_load_error(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    if ray:
        return serve_on_ray(specs, config, index=index_url or (str(index_dir) if needs_index or (index_dir / "manifest.json").is_file() else None),
                            mode=mode, host=host, port=port, replicas=replicas, autoscale=autoscale, cpus=cpus_per_replica, address=ray_address,
                            log_level=log_level, detach=detach)
    app = create_app(loader=load, config=config, on_load_error=stop_on_load_error)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5))
    keys = "on" if config.api_keys else "off"
    typer.echo(f"serving {', '.join(s.name for s in specs)} on http://{host}:{port} (API keys {keys}); loading models…", err=True)
    server.run()
    if failure:
        raise UserError(f"the models failed to load: {failure[0]}")


def serve_on_ray(specs, config, *, index, mode, host, port, replicas, autoscale, cpus, address, log_level, detach) -> None:
    from aimlqa.settings import UserError

    if detach and not address:
        raise UserError("--detach needs --ray-address: a cluster this command starts stops with it (start one with `ray start --head`)")
    from index.fetch import materialize
    from index.store import manifest_hash, read_manifest
    from server import scale

    scaling = None
    if autoscale:
        try:
            low, high = (int(x) for x in autoscale.split(":"))
            scaling = scale.Autoscaling(min_replicas=low, max_replicas=high)
        except ValueError as e:
            raise UserError(f"--autoscale {autoscale!r}: give MIN:MAX replicas, e.g. 1:4 ({e})") from None
    pinned = manifest_hash(read_manifest(materialize(index))) if index else None  # every replica must serve this one
    plan = scale.plan_for(specs, replicas=replicas, autoscaling=scaling, num_cpus=cpus, index=index, index_hash=pinned, mode=mode)
    groups = "; ".join(f"{g.name}: {', '.join(g.models)} x {g.autoscaling or g.replicas}" for g in plan.groups)
    typer.echo(f"serving on Ray Serve at http://{host}:{port} ({groups}; index {pinned or 'none'})"
               + ("" if detach else "; Ctrl-C stops"), err=True)
    scale.run(plan, config, host, port, address, blocking=not detach, log_level=log_level)
    if detach:
        typer.echo("deployed; the cluster serves it (`serve status` shows the replicas, `serve shutdown` stops it)", err=True)


def register(app: typer.Typer) -> None:
    app.command()(serve)
