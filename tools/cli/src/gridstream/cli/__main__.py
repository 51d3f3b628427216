from gridstream.cli.main import main

main()
