"""relaygate: POP-before-SMTP and IMAP-before-SMTP relay control.

This module imports nothing on purpose: the qmail chain programs
(``relay-ctrl-check`` runs once per SMTP connection) import submodules of this
package, and every import here would be paid on each of those start-ups.
"""

__version__ = "0.1.0"
