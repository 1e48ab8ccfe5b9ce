from lks.cli import main

raise SystemExit(main())
