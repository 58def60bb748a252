from batchrun.cli import program

program()
