"""Storage: the repository protocols (``base``), the back-end registry (``registry``), the shared SQL core
(``sql``) and one module per database (``backends``)."""
