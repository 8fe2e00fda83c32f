"""What the platform installs in, checks on, and removes from a source database."""
