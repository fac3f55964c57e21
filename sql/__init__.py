"""SQL migrations, shipped as package data (relay.sql) so `outbox migrate` works after pip install."""
