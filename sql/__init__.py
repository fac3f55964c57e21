"""SQL migrations, shipped as package data (outbox.sql) so `outbox migrate` works after pip install."""
