"""One module per dashboard view; each has `render(ctx)` and reads through `ctx.db.snapshot()`."""
