"""Sans-I/O protocol machines: bytes and ``now`` in, bytes and events out."""
