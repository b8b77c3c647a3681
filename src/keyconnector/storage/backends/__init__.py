"""One module per database, each found through the registry in ``storage.base``."""
