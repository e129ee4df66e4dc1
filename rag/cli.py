"""`aimlqa ask` and `aimlqa models`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from aimlqa.options import mode_option


def open_retriever(index: Optional[Path], required: bool = False):
    """The given index, else the default one if it exists; None when there is none and it is optional."""
    from aimlqa import settings
    from aimlqa.settings import UserError
    from index.retriever import Retriever

    path = index or settings.default_index_dir()
    if index is None and not (path / "manifest.json").is_file():
        if required:
            raise UserError(f"no index at {path}; build one with `make index` or pass --index DIR")
        return None
    return Retriever.load(path)


def ask(
    question: str = typer.Argument(..., help="The question"),
    model: Optional[str] = typer.Option(None, "--model", "-m", show_default="gemma-270m-aiml-cpp (llama.cpp; gemma-270m-aiml without it)",
                                        help="A registered model (see `aimlqa models`; the untuned base: gemma-270m)"),
    rag: bool = typer.Option(True, "--rag/--no-rag", help="Ground the answer in retrieved passages"),
    k: int = typer.Option(3, "-k", help="Passages to retrieve"),
    index: Optional[Path] = typer.Option(None, help="Index dir (default: $AIMLQA_HOME/indexes/course)"),
    mode: str = mode_option(),
    max_new_tokens: Optional[int] = typer.Option(None, help="Generation limit"),
    temperature: Optional[float] = typer.Option(None, help="0 = greedy"),
    beams: Optional[int] = typer.Option(None, "--beams", min=1, max=16, help="Beam search width (default: the model's; 1 = greedy)"),
    abstain: bool = typer.Option(True, "--abstain/--no-abstain", help="Say \"not in the course notes\" when the notes do not support an answer (--no-abstain: answer anyway, unsupported sentences marked)"),
    as_json: bool = typer.Option(False, "--json", help="Print the whole answer as JSON"),
):
    """Answer one question with a registered model; each sentence cites the sources that support it."""
    from aimlqa import settings
    from rag.answer import Answerer
    from rag.registry import get_spec

    spec = get_spec(model or settings.default_model())
    retriever = open_retriever(index, required=spec.backend == "retrieval" or (rag and index is not None)) if rag or spec.backend == "retrieval" else None
    if rag and retriever is None:
        typer.secho(f"note: no index at {settings.default_index_dir()}, so this answer is not grounded; "
                    "build one with `make index`, or pass --index DIR (or --no-rag)", fg=typer.colors.YELLOW, err=True)
    answer = Answerer(spec, retriever, mode=mode).answer(question, rag=rag, k=k, max_new_tokens=max_new_tokens, temperature=temperature,
                                                          num_beams=beams, abstain=abstain)
    if as_json:
        typer.echo(json.dumps(answer.to_dict(), indent=2, ensure_ascii=False))
        return
    show_answer(answer)
    t = answer.timings
    typer.echo(f"\n{answer.model}, rag={'on' if answer.rag else 'off'}, {answer.prompt_tokens}+{answer.completion_tokens} tokens, "
               f"retrieve {t.get('retrieve_ms', 0):.0f} ms, generate {t.get('generate_ms', 0):.0f} ms", err=True)


def show_answer(answer) -> None:
    """The cited answer (or the notice), then each source with the excerpts its markers point at."""
    from rag.citing import UNSUPPORTED_MARK

    text = answer.cited_text or "(no answer)"
    for part in text.split(UNSUPPORTED_MARK)[:-1]:  # "[unsupported]" stands out, as a warning does
        typer.echo(part, nl=False)
        typer.secho(UNSUPPORTED_MARK, fg=typer.colors.YELLOW, nl=False)
    typer.secho(text.split(UNSUPPORTED_MARK)[-1], fg=typer.colors.YELLOW if answer.abstained else None)
    if not answer.sources:
        return
    att = answer.attribution
    cited = {} if att is None or answer.abstained else {c.n: c.excerpt for s in att.sentences for c in reversed(s.citations)}
    typer.echo("\nClosest passages (not an answer):" if answer.abstained else "\nSources:")
    for n, s in enumerate(answer.sources, 1):
        typer.echo(f"  [{n}] {s.section_id} (score {s.score:.3f})" + ("" if n in cited or not cited else "  not cited"))
        if n in cited:
            typer.echo(f"      \"{cited[n]}\"")
    if att is not None:
        support = "" if answer.abstained == "no_relevant_passage" else f"support {att.support:.2f}, "
        note = " (re-ask with --no-abstain for the model's unchecked answer)" if answer.abstained else ""
        typer.echo(f"{support}relevance to the question {att.relevance:.2f}{note}", err=True)


def models():
    """List the registered models."""
    from rag.registry import load_registry

    for spec in load_registry().values():
        adapter = f" + {spec.adapter}" if spec.adapter else ""
        typer.echo(f"{spec.name:18} {spec.family:8} {spec.backend:12} {spec.base}{adapter}  {spec.description}")


adapters_app = typer.Typer(no_args_is_help=True, help="Adapters on a running server: list, load (serve at once), unload.")
ServerOption = typer.Option(None, "--server", help="The server's URL (default: $AIMLQA_SERVER, else http://127.0.0.1:8000); key: $AIMLQA_API_KEY")


@adapters_app.command("list")
def adapters_list(server: Optional[str] = ServerOption):
    """The models a server serves; adapters show the base they run on."""
    from rag.remote import ServerClient

    for card in ServerClient(server).models():
        on = f"adapter on {card['parent']}" if card.get("parent") else card["backend"]
        typer.echo(f"{card['id']:24} {on:44} {card.get('description', '')}")


@adapters_app.command("load")
def adapters_load(
    name: str = typer.Argument(..., help="The model name students will ask for"),
    path: Path = typer.Argument(..., help="What `aimlqa finetune` wrote (under the server's adapters directory, $AIMLQA_HOME/finetuned)"),
    server: Optional[str] = ServerOption,
    replace: bool = typer.Option(False, "--replace", help="Unload an adapter already served under NAME first"),
):
    """Serve a fine-tuned adapter on a running server, without a restart."""
    from rag.remote import ServerClient

    typer.echo(load_on_server(ServerClient(server), name, path, replace))


def load_on_server(client, name: str, path: Path, replace: bool = False) -> str:
    served = {c["id"]: c for c in client.models()}
    if name in served and replace:
        if not served[name].get("parent"):
            from aimlqa.settings import UserError

            raise UserError(f"{name!r} is a base model on {client.url}, not an adapter; pick another name")
        client.unload_adapter(name)
    reply = client.load_adapter(name, path)
    return f"{reply['message']} ({client.url}); ask it: aimlqa eval score --server {client.url} -m {name} ..."


@adapters_app.command("unload")
def adapters_unload(name: str = typer.Argument(...), server: Optional[str] = ServerOption):
    """Stop serving an adapter; requests already admitted for it finish first."""
    from rag.remote import ServerClient

    typer.echo(ServerClient(server).unload_adapter(name)["message"])


def register(app: typer.Typer) -> None:
    app.command()(ask)
    app.command()(models)
    app.add_typer(adapters_app, name="adapters")
