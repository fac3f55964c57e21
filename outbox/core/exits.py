"""Exit codes of every `outbox` command, so scripts and probes can tell outcomes apart."""

EXIT_OK = 0
EXIT_FAILED = 1  # the operation failed or needs a fix; the message names it
EXIT_USAGE = 2  # bad usage or configuration
EXIT_ATTENTION = 3  # `outbox status`, `outbox dev status`: the check ran, something needs attention
EXIT_INTERRUPTED = 130  # Ctrl-C
