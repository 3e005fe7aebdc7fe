"""The kern command."""
