"""The `asynccontainer` command."""
