"""The one exception type the CLI turns into a single line on stderr."""

import contextlib


class CocaError(Exception):
    """A problem the user can fix (bad name, missing file, mismatched checkpoint).

    ``exit_code`` follows the README: 1 when some inputs failed, 2 for usage errors.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(BaseException):
    """SIGTERM, raised so that files are closed and finished results kept on the way out.

    A BaseException, like KeyboardInterrupt, so that ``except Exception`` does not swallow it.
    """


@contextlib.contextmanager
def reading(path, what: str = ""):
    """Report the ways reading a text file fails (missing, not UTF-8, unreadable) as one line;
    ``what`` names the file's role in the messages ("labels file")."""
    named = f"{what} {path}" if what else str(path)
    try:
        yield
    except FileNotFoundError:
        raise CocaError(f"no such {what or 'file'}: {path}") from None
    except UnicodeDecodeError as err:
        raise CocaError(f"{named} is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise CocaError(f"cannot read {named}: {err.strerror or err}") from None
