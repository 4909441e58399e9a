"""One module per `lfw` subcommand; each defines `command`, a click command with no logic of its own."""
