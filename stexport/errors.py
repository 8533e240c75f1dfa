"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class StexportError(Exception):
    """Bad input or an impossible request. The message names the file and the fix."""


class BundleChanged(StexportError):
    """A bundle file no longer matches the sha256 its manifest recorded: no runtime may run it."""
