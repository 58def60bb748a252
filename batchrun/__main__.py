from batchrun.cli import main

main(prog_name="batchrun")  # not "python -m batchrun" in --version and usage lines
