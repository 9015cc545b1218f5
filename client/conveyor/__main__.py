"""`python -m conveyor`: the `conveyor` command."""

from conveyor._command import main

raise SystemExit(main())
