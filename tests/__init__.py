"""homeport tests."""
