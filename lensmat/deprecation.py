"""Old spellings that still work: a keyword renamed for one word, one meaning keeps its old name
for a while, with a :class:`DeprecationWarning` (standard library only)."""

from __future__ import annotations

import functools
import warnings


def renamed(**old_to_new: str):
    """Decorate a function whose keyword ``old`` is now ``new`` (``@renamed(max_tokens="max_fit_tokens")``):
    the old keyword is passed on under its new name with a warning; both at once is a TypeError."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__name__}() got both {old!r} and {new!r}; pass {new!r} only.")
                    warnings.warn(f"{fn.__name__}({old}=...) is now {fn.__name__}({new}=...); the old name will be "
                                  "removed.", DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)
        return inner
    return wrap
