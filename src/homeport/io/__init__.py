"""homeport.io."""
