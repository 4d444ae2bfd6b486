"""The one exception type of the data side.

Bad training data is a user problem, not a bug: it gets its own type so that the CLI can print a
short message (naming the file, and the line or row) instead of a traceback.
"""


class DataError(Exception):
    """Input or prepared data that memfit cannot use; the message names the file."""
