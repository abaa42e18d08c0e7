"""The one exception type users see.

Library code raises :class:`BitsweepError` for every input a user can get
wrong (a path, a bit width, a checkpoint). The CLI prints its message on one
line and exits with status 2, so nobody has to read a traceback to learn how
to fix their command. Programming errors stay ordinary exceptions.
"""


class BitsweepError(Exception):
    """A user-facing error whose message says what went wrong and how to fix it."""
