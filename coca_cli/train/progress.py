"""What a run tells: metrics.jsonl and its reporters, the progress line, and a clean stop on a signal."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import signal
import time
from pathlib import Path
from typing import Optional

from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.table import Column
from rich.text import Text

from ..errors import writing
from ..files import atomic_write
from .config import TrainConfig, reporters


class Metrics:
    """``metrics.jsonl`` plus TensorBoard / W&B when asked for (master process only)."""

    def __init__(self, output: Path, cfg: TrainConfig, enabled: bool, resumed_step: Optional[int]):
        self.path = output / "metrics.jsonl"
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        if resumed_step is not None and self.path.exists():
            self._truncate(resumed_step)  # drop what a killed run logged after its last checkpoint
        names = reporters(cfg.report_to)
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output / "tensorboard"))
        if "wandb" in names:
            import wandb

            self.wandb = wandb
            wandb.init(project=cfg.wandb_project, name=output.name, dir=str(output),
                       config=dataclasses.asdict(cfg), resume="allow")

    def _truncate(self, step: int) -> None:
        kept = []
        for line in self.path.read_bytes().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut off by the kill, or damaged
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line.decode("utf-8"))
        text = "".join(line + "\n" for line in kept)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with writing(self.path), open(self.path, "a", encoding="utf-8") as f:  # a diverged loss is null: JSON has no NaN
            f.write(json.dumps(finite, ensure_ascii=False, allow_nan=False) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        prefix = "val/" if record.get("split") == "val" else "train/"
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(prefix + key, value, record["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({prefix + k: v for k, v in scalars.items()}, step=record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class Progress:
    """Training progress on stderr, step/total and ETA first.

    On a terminal: a live bar whose step count and ETA keep their width at any terminal size
    (the losses after them are cut to fit). Otherwise (a log file, a pipe): a plain line at every
    logged step, and at least every ``plain_every_s`` seconds so a slow run never goes quiet.
    """

    plain_every_s = 30.0

    def __init__(self, console, total: int, enabled: bool, start_step: int = 0):
        self.console, self.total, self.start_step = console, total, start_step
        self.enabled = enabled and console is not None
        self.live = None
        self.started = self.last_line = time.monotonic()
        if self.enabled and console.is_terminal:
            def fixed():
                return Column(no_wrap=True)  # never squeezed: only the free-text column gives way

            self.live = RichProgress(TextColumn("training", table_column=fixed()),
                                     BarColumn(bar_width=20, table_column=fixed()),
                                     MofNCompleteColumn(table_column=fixed()),
                                     TimeRemainingColumn(table_column=fixed()), _CutToFit(),
                                     console=console, transient=False)
            self.task = self.live.add_task("train", total=total, info="")
            self.live.start()

    def update(self, step: int, record: Optional[dict], text: str) -> None:
        if not self.enabled:
            return
        if self.live is not None:
            self.live.update(self.task, completed=step, info=text)
        elif record is not None or time.monotonic() - self.last_line >= self.plain_every_s:
            self.console.print(f"step {step}/{self.total}  ETA {self.eta(step)}  {text}", markup=False,
                               highlight=False, soft_wrap=True)
            self.last_line = time.monotonic()

    def eta(self, step: int) -> str:
        """H:MM:SS left at the mean pace of the steps done since this run (or resumption) began."""
        done = step - self.start_step
        if done <= 0:
            return "-:--:--"
        seconds = (time.monotonic() - self.started) / done * (self.total - step)
        return str(datetime.timedelta(seconds=round(seconds)))

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


class _CutToFit(ProgressColumn):
    """The task's ``info`` on one line, cut with an ellipsis where the terminal ends."""

    def render(self, task):
        return Text(task.fields["info"], no_wrap=True, overflow="ellipsis")


class StopSignal:
    """SIGTERM (preemption) or a first Ctrl-C ask for a checkpoint and a clean stop."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.previous: dict = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, _frame):
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
