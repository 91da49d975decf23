"""A child process that ends with its parent however the parent ends (Linux ``PR_SET_PDEATHSIG``).

A parent killed outright (SIGKILL, the OOM killer) runs no clean-up: its children (the demo's
perception node, a recipe's training workers) ran on, orphaned. Linux can instead send the child
a signal when its parent exits; the request survives ``exec``.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["signal_when_parent_dies"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Looked up at import, in the parent: a child between fork and exec (``preexec_fn``) should not
# take the dynamic loader's locks, which another thread of the parent may have held at the fork.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def signal_when_parent_dies(signum: int, parent: int) -> bool:
    """In the child: ask for ``signum`` when the parent process exits (Linux; elsewhere nothing is
    asked). ``parent`` is the pid the child was started by; False when it has already gone (the
    request came too late: the caller must end by itself)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    return os.getppid() == parent
