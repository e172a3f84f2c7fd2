"""The ``mxserve`` console script: one module per subcommand, each thin (parse -> config -> library call)."""
