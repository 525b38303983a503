"""Byte layouts of homeport's wire protocols. Pure: no sockets, no clocks, no logging."""
