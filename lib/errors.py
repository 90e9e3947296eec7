"""Errors a user can cause (bad flags, wrong checkpoint, missing data).

`main.py` prints their message as one line and exits with code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    pass
