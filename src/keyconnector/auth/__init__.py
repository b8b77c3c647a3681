"""Bearer-token authentication against the Bitwarden identity server.

The HTTP layer needs only :class:`TokenValidator` (``start``, ``authenticate``, ``ready``, ``status``,
``refresh``, ``aclose``), the :class:`Principal` it returns and the :class:`AuthError` it raises;
``keyconnector.errors.UnavailableError`` signals that the identity server's keys cannot be had.
"""

from keyconnector.auth.validator import AuthError, Principal, TokenValidator

__all__ = ["AuthError", "Principal", "TokenValidator"]
