"""homeport.agent."""
