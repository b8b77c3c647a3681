"""Storage: the repository protocol and the back-end registry (``base``), the shared SQL core
(``sql``) and one module per database (``backends``)."""
