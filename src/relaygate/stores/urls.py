"""Store URLs as they may be shown (a leaf module: backends import it, the package too)."""

from __future__ import annotations


def redact_url(url: str) -> str:
    """A store URL safe to show: ``redis://:secret@host`` -> ``redis://:***@host``."""
    import re  # not at the top: the chain programs only pay for it on an error

    return re.sub(r"(//[^/@:]*:)([^/@]*)@", r"\1***@", url)
