"""Customer Strategy Lab."""
