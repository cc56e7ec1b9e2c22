"""`coca models`."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from . import app


@app.command("models")
def models_command(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List the model configs and the published pretrained weights.

    Example: coca models
    """
    import json

    from ..config import list_models
    from ..pretrained import PRETRAINED

    rows = [(name, ", ".join(PRETRAINED.get(name, {})) or "-") for name in list_models()]
    if as_json:
        print(json.dumps({name: list(PRETRAINED.get(name, {})) for name, _ in rows}, indent=2))
        return
    table = Table("model", "pretrained weights")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
