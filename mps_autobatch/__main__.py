"""``python -m mps_autobatch ...`` is the ``autobatch`` command."""

from .cli import app

app(prog_name="autobatch")
