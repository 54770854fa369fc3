"""``python -m kubetune_client``: the ``kubetune`` command line."""

from .cli import app

app(prog_name="kubetune")
