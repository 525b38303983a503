"""homeport.node."""
