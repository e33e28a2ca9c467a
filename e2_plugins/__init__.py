"""The ``e2-plugins`` application: the command line over the library (``e2_core``), the
harnesses (``e2_eval``) and the installed task and adapter plugins."""
