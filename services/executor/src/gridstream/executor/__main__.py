from gridstream.executor.main import main

main()
