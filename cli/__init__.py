"""The `stexport` command line (installed as the subpackage stexport.cli)."""
