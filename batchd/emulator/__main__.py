"""``python -m batchd.emulator``: serve the emulator until SIGINT/SIGTERM."""

import argparse
import sys

from batchd.emulator.cli import add_arguments, main

parser = argparse.ArgumentParser(prog="python -m batchd.emulator", description="Serve the batch API emulator.")
add_arguments(parser)
sys.exit(main(parser.parse_args()))
