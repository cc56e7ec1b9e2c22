"""The one exception type the CLI turns into a single line on stderr."""

import contextlib
import os
import re
from typing import Optional


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


@contextlib.contextmanager
def writing(path, what: str = ""):
    """Report a failed write (a full disk, a read-only folder, no permission) as one line naming
    the file and the operating system's reason, exit 1.

    torch.save and safetensors wrap the OSError in their own exception types; the reason is
    recovered from them (see :func:`os_reason`), so a full disk never reads as an internal error.
    """
    try:
        yield
    except CocaError:
        raise
    except Exception as err:
        reason = os_reason(err)
        if reason is None:
            raise
        named = f"{what} {path}" if what else str(path)
        raise CocaError(f"cannot write {named}: {reason}", exit_code=1) from None


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) spells an errno


def os_reason(err: BaseException) -> Optional[str]:
    """The operating system's reason behind ``err`` ("No space left on device"), or None when the
    failure did not come from the OS. Follows the exceptions it was raised from: torch.save to a
    Python file raises a RuntimeError from the file's OSError."""
    while err is not None:
        if isinstance(err, OSError):
            return err.strerror or str(err)
        found = _RUST_OS_ERROR.search(str(err))
        if found:
            return os.strerror(int(found.group(1)))
        err = err.__cause__ or err.__context__
    return None
