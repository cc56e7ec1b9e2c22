"""`coca train` and `coca finetune`: one option list, two sets of defaults.

``finetune`` is ``train`` with open_clip's MSCOCO caption fine-tuning recipe as defaults
(lr 1e-5, warmup 1000, wd 0.1, batch 128, one epoch, contrastive weight 0, caption weight 1);
every option can still be given.
"""

from __future__ import annotations

from typing import Optional

import typer

from ..errors import CocaError
from . import app, command_line, err_console

FINETUNE_DEFAULTS = {"lr": 1e-5, "warmup": 1000, "wd": 0.1, "epochs": 1, "batch_size": 128,
                     "coca_contrastive_loss_weight": 0.0, "coca_caption_loss_weight": 1.0,
                     "log_every_n_steps": 100}

TRAIN_HELP = """Train CoCa on image-caption pairs, on one or many GPUs (or CPU processes).

\b
Example: coca train --model coca_ViT-B-32 --data 'shards/train-{0000..0331}.tar' --train-num-samples 3000000 --dataset-resampled --output runs/b32
         coca train --model coca_tiny --data pairs.csv --csv-img-key filepath --csv-caption-key title --gpus 2
         coca train --data shards/ --output runs/b32 --resume latest

--gpus N (default: all visible GPUs; processes on CPU) relaunches through torchrun; under
torchrun or SLURM it runs as the rank it was given. The run folder (--output) holds
checkpoints, metrics.jsonl and, at the end, the final model in DIR/final/, which every
--pretrained accepts. SIGTERM saves a checkpoint before exiting.
"""

FINETUNE_HELP = """Fine-tune a pretrained CoCa for captioning (open_clip's MSCOCO recipe as defaults).

\b
Example: coca finetune --model coca_ViT-L-14 --pretrained laion2b_s13b_b90k --data coco_train.tsv --output runs/coco
         coca finetune --pretrained runs/b32/final --data coco_train.tsv --lr 2e-5 --epochs 2
         coca finetune --model hf-hub:laion/CoCa-ViT-B-32-laion2B-s13B-b90k --data coco_train.tsv

Defaults: lr 1e-5, warmup 1000, wd 0.1, batch size 128, 1 epoch, contrastive weight 0,
caption weight 1; any option can be overridden. CSV/TSV columns default to filepath/title.
"""


def train_command(
    ctx: typer.Context,
    data: str = typer.Option(..., "--data", help="Training pairs: a .csv/.tsv table, a folder of .tar shards, a shard "
                             "file or brace pattern (train-{0000..0331}.tar), several joined by '::'."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model config name or JSON path [default: "
                                        "coca_ViT-B-32, or the config inside --pretrained]"),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", "-p", help="Start from these weights: published "
                                             "tag, hf-hub:org/repo, native folder or checkpoint file."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Run folder [default: runs/DATE-MODEL]."),
    val_data: Optional[str] = typer.Option(None, "--val-data", help="Validation pairs (same formats), evaluated "
                                           "after each epoch."),
    dataset_type: str = typer.Option("auto", help="auto (by name), csv or webdataset."),
    csv_img_key: str = typer.Option("filepath", help="CSV column holding image paths."),
    csv_caption_key: str = typer.Option("title", help="CSV column holding captions."),
    csv_separator: Optional[str] = typer.Option(None, help="CSV separator [default: ',' for .csv, tab otherwise]."),
    train_num_samples: Optional[int] = typer.Option(None, min=1, help="Samples per epoch (needed for shards "
                                                    "without sizes.json)."),
    val_num_samples: Optional[int] = typer.Option(None, min=1, help="Validate on at most this many samples."),
    dataset_resampled: bool = typer.Option(False, help="Draw shards with replacement (web-scale pre-training)."),
    shuffle_buffer: int = typer.Option(1000, min=0, help="Shards: samples in the shuffle buffer."),
    workers: Optional[int] = typer.Option(None, min=0, help="Data loading processes per GPU [default: 4, at most "
                                          "the CPUs available to each process]."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=1, help="Batch size per GPU/process."),
    epochs: int = typer.Option(32, min=1, help="Epochs."),
    lr: float = typer.Option(5e-4, help="Peak learning rate."),
    wd: float = typer.Option(0.2, help="AdamW weight decay (not on norms, biases, logit scale, embeddings)."),
    beta1: float = typer.Option(0.9, help="AdamW beta1."),
    beta2: float = typer.Option(0.98, help="AdamW beta2."),
    eps: float = typer.Option(1e-6, help="AdamW epsilon."),
    warmup: int = typer.Option(10000, min=0, help="Linear warmup steps before the cosine decay (10% of the "
                               "steps when the run is not longer)."),
    grad_clip_norm: Optional[float] = typer.Option(None, help="Clip the gradient norm to this."),
    precision: str = typer.Option("auto", help="auto (amp on CUDA, fp32 otherwise), amp, amp_bf16, bf16 or fp32."),
    grad_checkpointing: bool = typer.Option(False, help="Recompute activations in backward to save memory."),
    compile: bool = typer.Option(False, "--compile", help="Run the training forward/backward under torch.compile "
                                 "(needs a C++ compiler on CPU, Triton on CUDA; the first steps are slow)."),
    gpu_decode: bool = typer.Option(False, "--gpu-decode", help="On CUDA, decode and augment training JPEGs on the "
                                    "GPU (torchvision.io.decode_jpeg); loader workers only read them."),
    accum_freq: int = typer.Option(1, min=1, help="Accumulate this many batches per step (the contrastive loss "
                                   "spans all of them)."),
    lock_image: bool = typer.Option(False, help="Freeze the image tower."),
    lock_image_unlocked_groups: int = typer.Option(0, min=0, help="With --lock-image: leave the last N groups "
                                                   "trainable."),
    lock_text: bool = typer.Option(False, help="Freeze the text tower."),
    lock_text_unlocked_layers: int = typer.Option(0, min=0, help="With --lock-text: leave the last N groups "
                                                  "trainable."),
    coca_caption_loss_weight: float = typer.Option(2.0, help="Weight of the caption loss."),
    coca_contrastive_loss_weight: float = typer.Option(1.0, help="Weight of the contrastive loss (0 skips it)."),
    local_loss: bool = typer.Option(False, help="Contrastive loss of local rows against all ranks' features."),
    gather_with_grad: bool = typer.Option(False, help="Gather features across ranks with gradient."),
    seed: int = typer.Option(0, help="Random seed."),
    device: str = typer.Option("auto", help="auto (cuda, then cpu), cpu, cuda."),
    gpus: Optional[int] = typer.Option(None, min=1, help="Processes on this machine [default: all visible GPUs, "
                                       "1 on CPU]; more than one relaunches through torchrun."),
    nnodes: int = typer.Option(1, min=1, help="Machines taking part."),
    node_rank: int = typer.Option(0, min=0, help="This machine's index (0 to nnodes-1)."),
    master_addr: Optional[str] = typer.Option(None, help="Address of the machine with --node-rank 0."),
    master_port: int = typer.Option(29500, help="Port on the master machine."),
    save_every_n_steps: int = typer.Option(0, min=0, help="Checkpoint every N steps (0: at the end of each "
                                           "epoch only)."),
    keep: int = typer.Option(3, min=1, help="Keep the last N checkpoints."),
    resume: Optional[str] = typer.Option(None, help="'latest' (this run's newest checkpoint, if any) or a "
                                         "checkpoint file/run folder."),
    log_every_n_steps: int = typer.Option(10, min=1, help="Write metrics every N steps."),
    report_to: str = typer.Option("", help="Also report to tensorboard and/or wandb (comma separated)."),
    wandb_project: str = typer.Option("coca", help="W&B project name."),
    skip_nonfinite: bool = typer.Option(False, help="Skip steps whose loss is NaN/inf instead of stopping."),
):
    from ..train.distributed import default_processes, launched, relaunch
    from ..train.config import TrainConfig, default_output, preflight
    from ..train.loop import train
    from ..weights.pretrained import brings_weights

    finetune = ctx.info_name == "finetune"
    if finetune and pretrained is None and not brings_weights(model):
        raise CocaError("coca finetune needs --pretrained (the weights to fine-tune), or --model hf-hub:org/repo "
                        "or local-dir:PATH")
    if model is None and pretrained is None:
        model = ctx.params["model"] = "coca_ViT-B-32"
    fields = {k: v for k, v in ctx.params.items() if k not in ("gpus", "nnodes", "node_rank", "master_addr",
                                                                "master_port")}
    cfg = TrainConfig(**fields)
    if not launched():
        nproc = gpus or (default_processes() if device in ("auto", "cuda") else 1)
        if nproc > 1 or nnodes > 1:
            preflight(cfg)  # fail here, in one line, rather than in every process
            _check_gpus(nproc, device)
            if output is None:  # every rank must write to the same folder
                ctx.params["output"] = default_output(model)
            return relaunch(command_line(ctx, drop=("gpus",)), nproc, nnodes, node_rank, master_addr, master_port)
    train(cfg, console=err_console)
    return 0


def _check_gpus(nproc: int, device: str) -> None:
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return  # processes on CPU
    if nproc > torch.cuda.device_count():
        raise CocaError(f"--gpus {nproc}, but only {torch.cuda.device_count()} GPUs are visible")


app.command("train", help=TRAIN_HELP)(train_command)
app.command("finetune", help=FINETUNE_HELP, context_settings={"default_map": FINETUNE_DEFAULTS})(train_command)
