"""One exception type for bad user input; the CLI prints its message as a one-line error."""


class UserError(Exception):
    """Bad input that the user can fix; the message names the problem and the fix."""
