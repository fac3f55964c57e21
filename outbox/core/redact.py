"""Keep credentials out of everything a human or a log shipper can read.

A DSN is the secret every component handles. `Dsn` carries it with a masked `str`/`repr`, and
`redact()` is the safety net for text we did not build ourselves (driver errors, tracebacks),
applied by the logging filter installed in `outbox.core.logs`. The Kafka SASL password is held as a
pydantic SecretStr and registered here, so redact() masks it too.
"""

from __future__ import annotations

import re

import psycopg.conninfo

MASK = "***"

# postgresql://user:secret@host -> postgresql://user:***@host (any scheme, so kafka/sasl URLs too)
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<secret>[^@\s]*)@")
# key=value conninfo and URL query strings: password=secret, password='se cret'
_KV_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<secret>'(?:[^'\\]|\\.)*'|[^\s&]+)", re.IGNORECASE)


# Secrets that do not sit in a DSN (the Kafka SASL password), registered when settings load.
_SECRETS: set[str] = set()


def register_secret(value: str) -> None:
    """Mask `value` wherever redact() meets it. Very short values are refused: masking every "a"
    would garble logs and still not protect a password that weak."""
    if len(value) >= 4:
        _SECRETS.add(value)
        _SECRETS.add(repr(value.encode())[2:-1])  # as it shows in a logged bytes repr


def redact(text: str) -> str:
    """Mask every password that looks like part of a DSN, and every registered secret, in `text`."""
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + MASK + "@", text)
    text = _KV_PASSWORD.sub(lambda m: m.group("head") + MASK, text)
    for secret in _SECRETS:
        text = text.replace(secret, MASK)
    return text


class Dsn:
    """A PostgreSQL connection string whose password never leaks through str/repr/format."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        value = value.strip()
        if not value:
            raise ValueError("the connection string is empty")
        try:
            params = psycopg.conninfo.conninfo_to_dict(value)
        except psycopg.Error as exc:
            # libpq's message may quote the input, so it is redacted as well.
            raise ValueError(f"not a valid PostgreSQL connection string: {redact(str(exc))}") from None
        # libpq only checks the port when connecting; fail at start-up instead.
        for port in str(params.get("port") or "5432").split(","):
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"not a valid PostgreSQL connection string: port {port!r} is not a number 1-65535")
        self._value = value

    def secret(self) -> str:
        """The real connection string, for handing to the driver and nothing else."""
        return self._value

    @property
    def masked(self) -> str:
        return redact(self._value)

    def params(self) -> dict[str, str]:
        return {k: str(v) for k, v in psycopg.conninfo.conninfo_to_dict(self._value).items()}

    def with_params(self, **overrides: str) -> "Dsn":
        """A DSN to the same server with some parameters replaced (e.g. another database)."""
        return Dsn(psycopg.conninfo.make_conninfo(self._value, **overrides))

    def __str__(self) -> str:
        return self.masked

    def __repr__(self) -> str:
        return f"Dsn({self.masked!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dsn) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)
