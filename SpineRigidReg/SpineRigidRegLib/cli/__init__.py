"""Command-line entry points (``srr-*``); each ``main(argv=None) -> int`` returns a process exit code."""
