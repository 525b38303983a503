"""homeport.server."""
