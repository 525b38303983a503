"""Identity and TLS: node keys, the network CA, certificate pinning."""
