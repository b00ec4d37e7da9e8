"""Checked values: every option of a container, validated once, in the caller.

Synchronous and pure: nothing here spawns, mounts or talks to the fork
server, and nothing imports anyio, so the fork server may load these
classes to read a plan.
"""
