"""torchrun for the processes that ``coca <command> --gpus N`` starts, ending as a coca command ends.

torchrun (``torch.distributed.run``) answers a failed process with a Python traceback and a framed
failure report on stderr, after the process's own one-line error, and exits 1 whatever the
process's code was. Here a failure ends with the exit code of the first process that failed (2
for a usage error, 1 for inputs that failed, 128 + N after signal N), and nothing more is printed.

    python -m coca_cli.train.torchrun [torchrun's options] -m coca_cli COMMAND ...
"""

from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in [*logging.root.manager.loggerDict, "torch.distributed"]:  # "failed (exitcode: 2) ...", banners
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(list(sys.argv[1:] if argv is None else argv)))
    except ChildFailedError as err:
        code = err.get_first_failure()[1].exitcode
        return code if code > 0 else 128 - code  # a negative code is the signal that ended the process
    except SignalException as err:  # the launcher itself was told to stop; its processes were too
        return 128 + int(err.sigval)
    except Exception as err:  # noqa: BLE001 - the processes could not be started (rendezvous, ports)
        print(f"coca: error: torchrun could not start the processes: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
