"""`coca convert`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app, err_console


@app.command("convert")
def convert_command(
    source: str = typer.Argument(..., help="open_clip checkpoint (.pt/.bin/.safetensors, training checkpoint or "
                                           "hub folder), a native folder, or a published tag."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model config name or JSON path "
                                        "(optional when SOURCE carries its config)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write."),
    to: str = typer.Option("native", "--to", help="native (model.safetensors + config.json) or openclip."),
):
    """Convert an open_clip CoCa checkpoint to a native folder (or back with --to openclip).

    Example: coca convert open_clip_pytorch_model.bin --model coca_ViT-B-32 --output weights/b32
    """
    from ..weights.convert import convert

    out = convert(source, output, model_name=model, to=to)
    err_console.print(f"wrote {out}")
