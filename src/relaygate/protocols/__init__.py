"""Sans-I/O protocol cores: bytes in, events and replies out; no sockets, no asyncio."""
