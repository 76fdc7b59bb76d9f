"""The `pdrun` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from launch import tiny_model

app = typer.Typer(
    name="pdrun",
    help="Prefill/decode disaggregation for vLLM: prefillers hand chunked KV to decoders over TCP.",
    no_args_is_help=True,
    add_completion=False,
)
model_app = typer.Typer(help="Models pdrun can build locally, with no download.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("tiny")
def model_tiny(
    directory: Annotated[
        Path | None, typer.Argument(help=f"Where to build it (default: {tiny_model.DEFAULT_DIR}).", file_okay=False)
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild even if a build of this recipe is already there.")
    ] = False,
) -> None:
    """Build the embedded tiny Llama model: random weights from a fixed seed, a BPE tokenizer
    trained locally, a chat template. A few MB, a few seconds; serve it with vLLM like any model.

    Example: pdrun model tiny /tmp/tiny && python -m vllm.entrypoints.openai.api_server --model /tmp/tiny
    """
    try:
        path = tiny_model.build(directory, force=force)
    except FileExistsError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(str(path))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
