"""How a private record may be shown: by where it came from, never by what it says.

Every log line, progress bar, exception or report that refers to a record goes through
:func:`describe` (location + reason) or :func:`fingerprint` (a keyed hash for joining, not
reversible without the run's key).  :func:`redact_text` exists for the rare place that must show
*something* of a string (e.g. a config value that might be private): it shows only its length.
"""

from __future__ import annotations

import hashlib
import hmac


def redact_text(text: object) -> str:
    """Stand-in for a possibly private string: its type and length, nothing of its content."""
    if isinstance(text, str):
        return f"<redacted str len={len(text)}>"
    if isinstance(text, bytes | bytearray):
        return f"<redacted bytes len={len(text)}>"
    return f"<redacted {type(text).__name__}>"


def describe(source: str, line: int | None, reason: str, unit: str = "line") -> str:
    """``file:line: reason`` — the only way a bad or dropped record is named."""
    where = f"{source}:{line}" if unit == "line" else f"{source}:{unit} {line}"
    return f"{where}: {reason}" if line is not None else f"{source}: {reason}"


def fingerprint(text: str, key: bytes) -> str:
    """Keyed 16-hex-digit digest of a text (HMAC-SHA256): joins records without showing them."""
    return hmac.new(key, text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:16]


def safe_exception_message(exc: BaseException) -> str:
    """An exception's class name only: messages from parsers can quote the offending input."""
    return exc.__class__.__name__
