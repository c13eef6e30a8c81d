"""``python -m sagellm_backend``: the ``sagellm-backend`` command."""

from __future__ import annotations

from sagellm_backend.cli import main

raise SystemExit(main())
