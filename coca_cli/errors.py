"""The one exception type the CLI turns into a single line on stderr."""


class CocaError(Exception):
    """A problem the user can fix (bad name, missing file, mismatched checkpoint).

    ``exit_code`` follows the README: 1 when some inputs failed, 2 for usage errors.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
