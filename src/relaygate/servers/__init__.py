"""asyncio glue: listeners and servers around the sans-I/O protocol cores."""
