"""The ``coca`` command: a thin Typer layer that parses, calls the library and prints."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import warnings
from enum import Enum
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
from rich.text import Text

from .. import __version__
from ..errors import CocaError, Terminated
from .options import Format


class _Commands(typer.core.TyperGroup):
    """Ctrl-C inside a command becomes our one-line error; Typer would exit 130 without a word."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise CocaError("interrupted", exit_code=130) from None


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="CoCa (Contrastive Captioners): captioning, zero-shot classification, retrieval, training.",
)
# Messages are single lines: never wrapped, and paths are never read as rich markup.
err_console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)


def _version(value: bool):
    if value:
        print(f"coca {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    """CoCa (Contrastive Captioners): captioning, zero-shot classification, retrieval, training."""


def stdout_format(requested: Optional[Format], as_json: bool = False) -> str:
    """Tables for people, lines for programs: a table on a terminal, JSON Lines in a pipe or file,
    unless --format (or --json, the same as --format jsonl) says otherwise."""
    if as_json and requested not in (None, Format.jsonl):
        raise CocaError(f"--json means --format jsonl: give one of them, not --format {requested.value} too")
    if as_json:
        return Format.jsonl.value
    if requested is not None:
        return requested.value
    return Format.table.value if sys.stdout.isatty() else Format.jsonl.value


def command_line(ctx: typer.Context, drop: tuple = ()) -> list[str]:
    """The running command's options as parsed, for relaunching it under torchrun."""
    args = [ctx.info_name]
    for param in ctx.command.params:
        if param.param_type_name != "option" or param.name in (*drop, "help"):
            continue
        value = ctx.params.get(param.name)
        if param.is_flag:
            if value:
                args.append(param.opts[0])
            elif param.secondary_opts:
                args.append(param.secondary_opts[0])
        elif value is not None:  # a choice (an Enum) as it was typed, not as Python spells it
            args += [param.opts[0], str(value.value if isinstance(value, Enum) else value)]
    return args


class progress:
    """Progress on stderr: a rich bar on a terminal; elsewhere (a log file, a pipe, a batch job) a
    plain line every ``every_s`` seconds. Time left is the time per item measured so far times the
    items left, so a slow first batch (model warm-up) does not make the estimate wildly short.

    ``with progress(total, label) as advance:`` then ``advance(n)`` after each n items.
    """

    every_s = 30.0  # between plain lines; 0 prints one per update
    clock = staticmethod(time.monotonic)

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done = total, label, 0
        self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), _TimeLeft(self),
                            console=err_console, transient=True, redirect_stdout=False,
                            redirect_stderr=False) if err_console.is_terminal else None  # stdout stays results
        if self.bar is not None:
            self.task = self.bar.add_task(label, total=total)

    def __enter__(self):
        self.started = self.last_line = self.clock()
        if self.bar is not None:
            self.bar.start()
        return self.advance

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.advance(self.task, n)
            return
        now = self.clock()
        if now - self.last_line >= self.every_s:
            self.last_line = now
            err_console.print(f"{self.label}: {self.done}/{self.total} ({100 * self.done // max(self.total, 1)}%), "
                              f"{_clock(now - self.started)} elapsed, {self.time_left(now)} left")

    def time_left(self, now: float) -> str:
        if not self.done:
            return "-:--:--"
        return _clock((now - self.started) / self.done * (self.total - self.done))


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class _TimeLeft(ProgressColumn):
    """The bar's ETA from :meth:`progress.time_left` (rich's own extrapolates its latest samples)."""

    def __init__(self, owner: progress):
        super().__init__()
        self.owner = owner

    def render(self, task) -> Text:
        return Text(self.owner.time_left(self.owner.clock()), style="progress.remaining")


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: user errors become one line on stderr and an exit code, never a traceback."""
    command = typer.main.get_command(app)
    try:
        with _sigterm_as_interrupt(), warnings.catch_warnings():
            warnings.showwarning = _warning_line
            result = command.main(args=argv, prog_name="coca", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except CocaError as err:
        return _fail(str(err), err.exit_code)
    except Terminated:
        return _fail("terminated", 143)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as err:  # noqa: BLE001 - every failure gets one line; COCA_DEBUG shows the traceback
        # Typer vendors its own click, so its parser errors are recognised by shape, not class.
        if hasattr(err, "format_message") and hasattr(err, "exit_code"):
            return _fail(err.format_message(), 2)
        if type(err).__name__ == "Abort":
            return _fail("interrupted", 130)
        if os.environ.get("COCA_DEBUG"):
            raise
        if isinstance(err, ValueError):  # invalid settings reported by the library
            return _fail(str(err), 2)
        return _fail(f"unexpected {type(err).__name__}: {err} (set COCA_DEBUG=1 for the traceback)", 1)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Python dies on SIGTERM without unwinding; raising instead lets every command close its
    output files (each result already flushed) and save indexes or checkpoints on the way out."""
    pid = os.getpid()

    def terminate(signum, frame):
        if os.getpid() != pid:  # a forked data loader worker: die as SIGTERM's default would
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings (ours and our dependencies') as one line each, like the commands' own, not
    Python's two (``file:line: UserWarning: ...`` and the source line)."""
    text = str(message).strip()
    print(f"warning: {text.splitlines()[0] if text else category.__name__}", file=sys.stderr)


def _fail(message: str, code: int) -> int:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"coca: error: {first}", file=sys.stderr)
    return code


def entry() -> None:
    sys.exit(main())


# Each command lives in its own module and registers itself on `app`.
from . import (caption, classify, coco, convert, embed, eval_captions, evaluate, models, retrieve, score,  # noqa: E402,F401
               train)
