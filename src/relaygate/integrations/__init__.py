"""Integrations with existing mail servers (qmail chain programs, Dovecot hooks, log watchers)."""
