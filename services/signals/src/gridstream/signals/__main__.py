from gridstream.signals.main import main

main()
