"""``python -m gridstream.ingestor``."""

from gridstream.ingestor.main import main

main()
