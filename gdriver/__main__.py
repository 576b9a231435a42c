from gdriver.cli import main

main()
