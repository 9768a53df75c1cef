"""python -m nblora_diffusion.microworld pretrain|subjects ... (see --help)."""

import sys

from .cli import main

sys.exit(main())
