"""The fork server and the processes it clones: synchronous, single-threaded, no anyio.

Code here runs in the exec'd helper process (`server`) or in a container
or excursion child after clone (everything else). It never imports the
async API: the server must stay small, and a child must not touch state
it does not own.
"""
