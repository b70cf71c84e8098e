from pocketlm.cli.main import run

run()
