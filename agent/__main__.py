"""`python -m agent` is the same as the `therelay-agent` command."""

from agent.cli import main

raise SystemExit(main())
