import sys

from greenstack.cli import main

sys.exit(main())
