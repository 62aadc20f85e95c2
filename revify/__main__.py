import sys

from revify.cli import main

sys.exit(main())
