"""Exit codes of every `outbox` command, so scripts and probes can tell outcomes apart."""

EXIT_OK = 0
EXIT_FAILED = 1  # the operation failed or needs a fix; the message names it
EXIT_USAGE = 2  # bad usage or configuration
EXIT_ATTENTION = 3  # `outbox status`, `outbox dev status`: the check ran, something needs attention
# The three below are refusals a restart cannot cure: an orchestrator restarting on them would only
# hide the message, so they stop with a code that says whose fix it is.
EXIT_LOGIN_REFUSED = 4  # PostgreSQL refused the login (password, pg_hba.conf, unknown role): fix the credentials
EXIT_PRIVILEGE = 5  # the role lacks a privilege, REPLICATION, or the publication: the message has the GRANT
EXIT_TOPIC_MISSING = 6  # a Kafka topic is missing and the relay may not create it
EXIT_INTERRUPTED = 130  # Ctrl-C
