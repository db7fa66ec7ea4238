"""``python -m molf.sweep CONFIG.yaml``: the same as ``molf sweep CONFIG.yaml``."""

from molf.sweep import main

raise SystemExit(main())
