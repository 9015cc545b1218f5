"""Where tasks live: the store seam (`base`) and its implementations."""
