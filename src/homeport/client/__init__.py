"""homeport.client."""
