"""State on disk: atomic writes (temp file, fsync, rename) and state-folder locks."""
