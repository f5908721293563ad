"""The top layer: the ``drhouse`` command line and the launcher that starts Redis, workers and
frontends. Nothing imports it."""
