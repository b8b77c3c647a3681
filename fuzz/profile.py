"""A pytest plugin that registers the hypothesis profile ``fuzz`` for ``make fuzz``.

It is loaded with ``-p fuzz.profile`` because hypothesis loads ``--hypothesis-profile`` when pytest
configures itself, before any test module (or a profile registered there) is imported.
``KC_FUZZ_EXAMPLES`` sets the number of examples per property (default 20000).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("KC_FUZZ_EXAMPLES", "20000")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
