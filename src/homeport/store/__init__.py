"""homeport.store."""
