"""Built-in executions, addressable by name (``machinable.execution.<name>``)."""
