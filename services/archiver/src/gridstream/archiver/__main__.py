from gridstream.archiver.main import main

main()
