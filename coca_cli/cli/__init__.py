"""The ``coca`` command: a thin Typer layer that parses, calls the library and prints."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Optional

import typer
from rich.console import Console

from .. import __version__
from ..errors import CocaError, Terminated


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


def pick_device(device: str) -> str:
    """'auto' means the fastest present: CUDA, then Apple MPS, then CPU."""
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


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
        elif value is not None:
            args += [param.opts[0], str(value)]
    return args


class progress:
    """A rich progress bar on stderr (hidden when stderr is not a terminal)."""

    def __init__(self, total: int, label: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 console=err_console, transient=True, disable=not err_console.is_terminal,
                                 redirect_stdout=False, redirect_stderr=False)  # results on stdout stay there
        self.task = self.progress.add_task(label, total=total)

    def __enter__(self):
        self.progress.start()
        return lambda: self.progress.advance(self.task)

    def __exit__(self, *exc):
        self.progress.stop()


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: user errors become one line on stderr and an exit code, never a traceback."""
    command = typer.main.get_command(app)
    try:
        with _sigterm_as_interrupt():
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


def _fail(message: str, code: int) -> int:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"coca: error: {first}", file=sys.stderr)
    return code


def entry() -> None:
    sys.exit(main())


# Each command lives in its own module and registers itself on `app`.
from . import caption, classify, coco, convert, eval_captions, evaluate, models, retrieve, train  # noqa: E402,F401
