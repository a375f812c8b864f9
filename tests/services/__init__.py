"""Private instances of outside services (PostgreSQL) that the tests start and stop themselves."""
