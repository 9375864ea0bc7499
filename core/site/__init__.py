"""The local site runner: ``mailyard site up`` starts and supervises a whole site."""
