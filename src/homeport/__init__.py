"""homeport: reach machines behind NAT with plain OpenSSH, through a self-hosted relay."""

__version__ = "0.1.0"
