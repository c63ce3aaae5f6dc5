"""Command line: one small module per subcommand (parse -> config -> library call)."""
