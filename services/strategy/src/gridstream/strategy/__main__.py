from gridstream.strategy.main import main

main()
