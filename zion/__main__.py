from zion.cli import main

raise SystemExit(main())
