import sys

from lensmat.cli import main

sys.exit(main())
