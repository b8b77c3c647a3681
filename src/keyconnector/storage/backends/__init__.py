"""One module per database, each exposing one ``BACKEND`` entry found through ``storage.registry``."""
