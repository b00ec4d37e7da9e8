"""Run a function in a fresh container and get its value: `anyio.to_process`'s counterpart.

::

    import asynccontainer as ac

    total = await ac.to_container.run_sync(sum, [1, 2, 3])
"""

from ._core.to_container import current_default_container_limiter, run_sync

__all__ = ["current_default_container_limiter", "run_sync"]

for _function in (current_default_container_limiter, run_sync):
    _function.__module__ = __name__
del _function
