"""Workers: what runs attempts. `local` runs the handlers loaded into this server."""
