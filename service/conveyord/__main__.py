import sys

from conveyord.cli import main

sys.exit(main())
