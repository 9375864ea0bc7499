"""The ``mailyard`` command line: one module per command group."""
