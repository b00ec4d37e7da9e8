"""`python -m asynccontainer`: the same as the `asynccontainer` command."""

from ._cli.main import entry_point

if __name__ == "__main__":
    entry_point()
