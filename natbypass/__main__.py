import sys

from natbypass.cli import main

sys.exit(main())
