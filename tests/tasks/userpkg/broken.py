"""A task module whose own import fails (a missing dependency)."""

import fedmq_no_such_dependency  # noqa: F401
