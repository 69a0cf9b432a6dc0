"""Store URLs as they may be shown (a leaf module: backends import it, the package too)."""

from __future__ import annotations


def redact_url(url: str) -> str:
    """A store URL safe to show: ``redis://:secret@host`` -> ``redis://:***@host``,
    ``?password=secret`` (and ``sentinel_password=``) -> ``?password=***``."""
    import re  # not at the top: the chain programs only pay for it on an error

    url = re.sub(r"(//[^/@:]*:)([^/@]*)@", r"\1***@", url)
    return re.sub(r"([?&][^=&#]*password=)[^&#]*", r"\1***", url, flags=re.IGNORECASE)
