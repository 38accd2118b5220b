"""The one exception type for user mistakes; command-line tools print it as one line."""


class UserError(Exception):
    """A mistake in what the user gave (a path, a file's content, a flag): shown without a traceback."""
