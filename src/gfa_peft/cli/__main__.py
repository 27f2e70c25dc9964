import sys

from gfa_peft.cli import main

sys.exit(main())
