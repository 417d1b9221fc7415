"""Tools on top of everything: the ``statqat`` command line (demo, analyze, export), the
example models and data, training helpers and saved converted models."""
