import sys

from grappa.cli import main

sys.exit(main())
