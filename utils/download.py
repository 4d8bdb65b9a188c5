"""`python3 -m utils.download`: the checkpoint downloader's command line, kept at this short name
(the downloads themselves are `utils.infra.download`)."""

from utils.infra.download import main
from utils.infra.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
