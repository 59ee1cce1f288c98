import sys

from selfmask.cli import main

sys.exit(main())
