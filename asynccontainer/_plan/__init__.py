"""The plan: a container's set-up decided in the caller, as a flat list of steps.

`build` turns a spec and a target into a `ContainerPlan` (the caller's
side); `steps` holds the step classes, plain data that the fork server's
executor reads (and that imports nothing of the caller's side).
"""
