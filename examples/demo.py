"""The main job end to end on a laptop CPU (``make demo``): ``ki-trainer demo`` as a script.

Two teachers are fine-tuned on disjoint halves of debian_sections20 and merged WITHOUT labels into
one student (MUKI and vanilla KD); the table is printed and written to outputs/demo/results.json
(in the repository, wherever this is started from). The code, and the measured run, are in
:mod:`ki_trainer.cli.demo`; ``python examples/demo.py --help`` lists the options.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python examples/demo.py
"""

import sys
from pathlib import Path

from ki_trainer.cli.demo import main

OUT = Path(__file__).resolve().parent.parent / "outputs" / "demo"

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(arg.split("=")[0] == "--output_dir" for arg in argv):
        argv += ["--output_dir", str(OUT)]
    main(argv, prog="examples/demo.py")
