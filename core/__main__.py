from mailyard.cli.main import main

main()
