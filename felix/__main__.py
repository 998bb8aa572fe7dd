import sys

from felix.cli import main

sys.exit(main())
