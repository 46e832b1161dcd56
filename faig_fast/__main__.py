import sys

from faig_fast.cli import main

sys.exit(main())
