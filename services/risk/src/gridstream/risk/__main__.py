from gridstream.risk.main import main

main()
