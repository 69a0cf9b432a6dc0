"""The IMAP server: pymap embedded behind relaygate's adapter (:mod:`.service`)."""
