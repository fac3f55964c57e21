"""SQL identifiers and literals for the one place that cannot bind parameters: commands on a
replication connection (CREATE_REPLICATION_SLOT, START_REPLICATION). Everywhere else, bind
parameters or use psycopg.sql.Identifier."""

from __future__ import annotations


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    # standard_conforming_strings is on for replication connections: only quotes need doubling.
    return "'" + text.replace("'", "''") + "'"
