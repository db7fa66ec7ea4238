from molf.cli import main

raise SystemExit(main())
