"""`outbox demo`: the pipeline end to end on the dev stack, with failures on purpose."""
