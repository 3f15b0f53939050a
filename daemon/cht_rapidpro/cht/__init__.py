"""Pure CHT domain logic: states, phone numbers, credentials, SMS parsing (no I/O)."""
