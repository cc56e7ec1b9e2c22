"""`coca caption`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import CocaError
from . import app, err_console, pick_device, progress


@app.command("caption")
def caption_command(
    inputs: List[str] = typer.Argument(..., help="Image files, folders (searched recursively) or glob patterns."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model config name or JSON path "
                                        "[default: coca_ViT-L-14, or the config inside --pretrained]"),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", "-p", help="Published tag, hf-hub:org/repo, "
                                             "native folder or checkpoint file "
                                             "[default: mscoco_finetuned_laion2b_s13b_b90k]"),
    device: str = typer.Option("auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps."),
    precision: str = typer.Option("fp32", help="fp32, bf16 or fp16."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Images per batch."),
    workers: int = typer.Option(0, min=0, help="Background processes decoding images."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to FILE (.jsonl, .csv or .txt)."),
    as_json: bool = typer.Option(False, "--json", help="JSON Lines on stdout instead of path<TAB>caption."),
    resume: bool = typer.Option(False, help="Skip images already in --output."),
    generation_type: str = typer.Option("beam_search", help="beam_search, top_k or top_p."),
    seq_len: int = typer.Option(30, help="Maximum caption length in tokens (incl. start/end)."),
    min_seq_len: int = typer.Option(5, help="Minimum caption length in tokens."),
    num_beams: int = typer.Option(6, help="Beams for beam search."),
    num_beam_groups: int = typer.Option(3, help="Diverse beam search groups (must divide --num-beams)."),
    top_k: int = typer.Option(1, help="top_k sampling: keep the K most likely tokens (1 = greedy)."),
    top_p: float = typer.Option(0.1, help="top_p sampling: keep tokens within this probability mass."),
    temperature: float = typer.Option(1.0, help="Sampling temperature."),
    repetition_penalty: float = typer.Option(1.0, help="Penalty for repeated tokens (1.0 = none)."),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling."),
):
    """Caption images, writing each result as soon as it is ready.

    \b
    Examples:
      coca caption photos/*.jpg
      coca caption photos/ --output captions.jsonl --resume
    """
    import torch

    from ..captioning import CaptionWriter, caption_images
    from ..factory import create_model_and_transforms
    from ..images import collect_images
    from ..pretrained import DEFAULT_CAPTION_MODEL, DEFAULT_CAPTION_PRETRAINED

    generation = dict(generation_type=generation_type, seq_len=seq_len, min_seq_len=min_seq_len, num_beams=num_beams,
                      num_beam_groups=num_beam_groups, top_k=top_k, top_p=top_p, temperature=temperature,
                      repetition_penalty=repetition_penalty)
    from ..generation import validate_options

    validate_options(**generation)
    paths = collect_images(inputs)
    if pretrained is None:
        pretrained = DEFAULT_CAPTION_PRETRAINED
        model = model or DEFAULT_CAPTION_MODEL
    writer = CaptionWriter(output, as_json=as_json, resume=resume)
    todo = [p for p in paths if str(p) not in writer.done]
    if not todo:
        writer.close()
        err_console.print(f"all {len(paths)} images are already captioned in {output}")
        return
    net, _, transform = create_model_and_transforms(model, pretrained, precision=precision, device=pick_device(device))
    generator = torch.Generator(device=next(net.parameters()).device).manual_seed(seed) if seed is not None else None
    failed = 0
    with writer, progress(len(todo), "captioning") as advance:
        for path, caption, reason in caption_images(net, transform, todo, batch_size, workers, generator=generator,
                                                    **generation):
            if caption is None:
                failed += 1
                err_console.print(f"skipped {path}: {reason}")
            else:
                writer.write(str(path), caption)
            advance()
    if failed:
        raise CocaError(f"{failed} of {len(todo)} images could not be captioned", exit_code=1)
