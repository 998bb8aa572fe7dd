import sys

from felix.cli.main import main

sys.exit(main())
