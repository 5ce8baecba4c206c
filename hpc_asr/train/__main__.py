"""``python -m hpc_asr.train`` (the alias of ``hpc-asr train``): see ``hpc_asr.train.loop``."""

import sys

from hpc_asr.train.loop import main

sys.argv[0] = "hpc-asr train"  # what --help and errors print as the program name
sys.exit(main())
