"""keyconnector: a drop-in, hardened replacement for Bitwarden's Key Connector."""

__version__ = "0.1.0"
