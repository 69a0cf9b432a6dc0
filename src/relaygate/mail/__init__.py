"""The built-in mail system: users, Maildir, the outbound queue and delivery."""
