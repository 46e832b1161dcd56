import sys

from faig_fast.apps.cli import main

sys.exit(main())
