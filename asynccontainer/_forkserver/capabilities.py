"""The capability drop in the container: the bounding set, then the other four sets.

A process that is root in its own user namespace holds every capability
there (user_namespaces(7)). The container keeps only the set the plan
names, in all five sets at once (capabilities(7)):

- bounding: dropped first (PR_CAPBSET_DROP needs CAP_SETPCAP, which is
  given up last), so no execve can bring a capability back;
- permitted, effective and inheritable: set with capset(2);
- ambient: the kept set, so that a target that is not uid 0 (a service's
  `user=`) keeps it across execve too; cleared first, so nothing else is.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

from .. import _kernel
from .._kernel import capabilities as _caps
from .._spec.capabilities import missing_capabilities

__all__ = ["keep_only", "limit_bounding_set"]

# <linux/capability.h>
_CAP_SETPCAP = 8


def _mask(numbers: Iterable[int]) -> int:
    mask = 0
    for number in numbers:
        mask |= 1 << number
    return mask


def _drop_from_bounding_set(kept: int) -> None:
    number = 0
    while True:
        held = _caps.in_bounding_set(number)
        if held is None:
            return
        if held and not kept >> number & 1:
            _kernel.prctl(_caps.PR_CAPBSET_DROP, number)
        number += 1


def limit_bounding_set(keep: frozenset[int], required: bool, switching_user: bool) -> int:
    """Drop every capability but `keep` from the bounding set; return the mask kept.

    Runs before a service's setuid: with `switching_user`, PR_SET_KEEPCAPS
    keeps the permitted set across it, for `keep_only` to settle after.
    Capabilities in `keep` the process does not hold are an error when
    `required`, and are left out otherwise (the default set, for a caller
    without a user namespace and without root).

    Raises:
        PermissionError: a required capability is not held.
    """
    effective, permitted, _ = _caps.capget()
    wanted = _mask(keep)
    missing = wanted & ~permitted
    if missing and required:
        raise PermissionError(errno.EPERM, missing_capabilities(missing))
    kept = wanted & permitted
    # The bounding set cannot shrink without CAP_SETPCAP (capabilities(7)):
    # so it is for a caller without root and without a user namespace, which
    # holds no capability to lose, and no_new_privs keeps a setuid program
    # from granting it any.
    if effective >> _CAP_SETPCAP & 1:
        _drop_from_bounding_set(kept)
    if switching_user:
        _kernel.prctl(_caps.PR_SET_KEEPCAPS, 1)
    return kept


def keep_only(kept: int) -> None:
    """Make the permitted, effective, inheritable and ambient sets exactly `kept`.

    Raises:
        OSError: as capset(2) or prctl(2) fail.
    """
    _caps.capset(kept, kept, kept)
    _kernel.prctl(_caps.PR_CAP_AMBIENT, _caps.PR_CAP_AMBIENT_CLEAR_ALL)
    number = 0
    while kept >> number:
        if kept >> number & 1:
            # Needs the capability in permitted and inheritable (set above).
            _kernel.prctl(_caps.PR_CAP_AMBIENT, _caps.PR_CAP_AMBIENT_RAISE, number)
        number += 1
    _kernel.prctl(_caps.PR_SET_KEEPCAPS, 0)
