"""`coca models`."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Column, Table

from . import app


@app.command("models")
def models_command(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List the model configs: size, image size, text context, published weights and whether
    they are already downloaded (cached).

    Example: coca models
    """
    import dataclasses
    import json

    from ..weights.catalog import describe_models

    infos = describe_models()
    if as_json:
        print(json.dumps({info.name: dataclasses.asdict(info) for info in infos}, indent=2))
        return
    table = Table(Column("model", no_wrap=True), "params", "image", "context",
                  Column("pretrained weights", overflow="fold"))
    for info in infos:
        tags = "\n".join(p.tag + (" (cached)" if p.cached else "") for p in info.pretrained) or "-"
        params = "?" if info.parameters is None else f"{info.parameters / 1e6:.1f}M"
        table.add_row(info.name, params, str(info.image_size), str(info.context_length), tags)
    Console().print(table)
