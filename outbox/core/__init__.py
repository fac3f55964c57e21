"""The shared core: the event envelope, settings, redaction, logging, LSN and time helpers, SQL
identifiers, operator command strings, exit codes and migrations. It imports no component, so an
application that embeds only the inbox library never imports the relay."""
