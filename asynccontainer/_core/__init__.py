"""The async caller side: the fork server's client, containers, excursions, PID files.

Everything here runs in the caller's event loop (anyio: asyncio or trio)
and never forks.
"""
