"""Command-line verbs, one module per area; each holds plain typed functions that
``snnet.cli`` registers as commands. They parse and validate, then call the library."""
