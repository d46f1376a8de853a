"""One module per ``spine-node`` sub-command (``add_arguments`` and ``run``)."""
