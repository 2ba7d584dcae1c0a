"""Configuration files: the one loader both applications use (TOML, environment, paths, error texts)."""
